"""`rnnserve evaluate`: the quality figures of a model folder on any text or line-aligned files."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from rnnserve.models.folder import load_lm, load_translation
from rnnserve.paths import MODELS_DIR
from rnnserve.text import tokenize
from rnnserve.training.lm import evaluate_lm
from rnnserve.training.translation import corpus_bleu, translate_ids


def resolve_model(model: str) -> Path:
    """A served model's name (a folder under models/) or a path to a model folder."""
    path = Path(model)
    if (path / "config.json").exists():
        return path
    if (MODELS_DIR / model / "config.json").exists():
        return MODELS_DIR / model
    raise SystemExit(f"no model folder {model!r} (neither a path nor a name under {MODELS_DIR})")


def evaluate_text(folder: Path, text_file: Path) -> dict:
    lm = load_lm(folder)
    text = text_file.read_text(encoding="utf-8")
    ids = torch.tensor(lm.tokenizer.encode(text), dtype=torch.long)
    batch = max(1, min(32, (len(ids) - 1) // 256))  # short texts: fewer, longer streams
    loss = evaluate_lm(lm.model, ids, batch_size=batch)
    return {"model": lm.meta.get("name", folder.name), "characters": len(text), "loss": loss,
            "perplexity": math.exp(loss), "bits_per_char": loss / math.log(2)}


def evaluate_translation(folder: Path, src_file: Path, ref_file: Path, beam_size: int, alpha: float) -> dict:
    tr = load_translation(folder)
    src = [tokenize(line) for line in src_file.read_text(encoding="utf-8").splitlines()]
    refs = [" ".join(tokenize(line)) for line in ref_file.read_text(encoding="utf-8").splitlines()]
    if len(src) != len(refs):
        raise SystemExit(f"{src_file} has {len(src)} lines but {ref_file} has {len(refs)}")
    t0 = time.perf_counter()
    out = translate_ids(tr.model, [tr.src.encode(s) for s in src], beam_size=beam_size, alpha=alpha)
    seconds = time.perf_counter() - t0
    hyps = [" ".join(tr.tgt.decode(h)) for h in out]
    bleu, chrf = corpus_bleu(hyps, refs)
    return {"model": tr.meta.get("name", folder.name), "bleu": bleu, "chrf": chrf, "sentences": len(src),
            "seconds": seconds, "beam_size": beam_size, "length_penalty": alpha}


def main(args) -> int:
    folder = resolve_model(args.model)
    if args.text_file:
        result = evaluate_text(folder, Path(args.text_file))
    elif args.src_file and args.ref_file:
        result = evaluate_translation(folder, Path(args.src_file), Path(args.ref_file), args.beam_size,
                                      args.length_penalty)
    else:
        raise SystemExit("give --text-file (language models) or --src-file and --ref-file (translation)")
    print(json.dumps(result, indent=1))
    return 0
