"""`rnnserve attention`: a translation's attention matrix as a picture, source tokens along the bottom,
output tokens down the side, so that one sees which source words each output word was read from."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from rnnserve.engine.translation_engine import TranslationEngine, TranslationParams
from rnnserve.models.folder import load_translation
from rnnserve.offline import resolve_model


@dataclass
class Attention:
    source: list[str]  # source pieces
    output: list[str]  # output pieces
    weights: list[list[float]]  # one row per output piece, one column per source piece
    text: str  # the translation


def attention(folder: Path, text: str, beam_size: int = 4, target_prefix: str | None = None) -> Attention:
    tr = load_translation(folder)
    src = tr.src.encode(text)
    if not src:
        raise SystemExit("rnnserve attention: error: the text has nothing to translate")
    engine = TranslationEngine(tr.model, max_rows=beam_size, max_source_tokens=max(256, len(src)))
    prefix = [tr.tgt.encode(target_prefix)] if target_prefix else None
    engine.add("one", [src], TranslationParams(beam_size=beam_size, return_attention=True), prefix)
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                r = out.results[0]
                return Attention(tr.src.pieces(src), tr.tgt.pieces(r.tokens), r.attention, tr.tgt.decode(r.tokens))
    raise RuntimeError("engine stopped without finishing")


def draw(a: Attention, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    w, h = max(4.0, 0.5 * len(a.source) + 2), max(3.0, 0.4 * len(a.output) + 2)
    fig, ax = plt.subplots(figsize=(w, h))
    ax.imshow(a.weights, cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(a.source)), [p.replace("\u2581", "_") for p in a.source], rotation=60, ha="right")
    ax.set_yticks(range(len(a.output)), [p.replace("\u2581", "_") for p in a.output])
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    ax.set_title(a.text, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args) -> int:
    a = attention(resolve_model(args.model), args.text, args.beam_size, args.target_prefix)
    draw(a, Path(args.out))
    sys.stdout.write(a.text + "\n")
    return 0
