"""Models without the server: `rnnserve translate` and `rnnserve generate` run the serving engines
in-process on a model folder, the way a user checks a model before deploying it."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Iterable, TextIO

from rnnserve.engine.lm_engine import LMEngine
from rnnserve.engine.sampling import SamplingParams
from rnnserve.engine.translation_engine import TranslationEngine, TranslationParams
from rnnserve.models.folder import load_lm, load_translation
from rnnserve.models.seq2seq import Seq2Seq
from rnnserve.paths import MODELS_DIR


def resolve_model(model: str) -> Path:
    """A model folder's path, or a model's name under RNNSERVE_MODELS_DIR (default models/): its folder's name or
    the name it is served under (config.json's "name", from `--name`)."""
    import json
    import os

    path = Path(model)
    if (path / "config.json").exists():
        return path
    models_dir = Path(os.environ.get("RNNSERVE_MODELS_DIR") or MODELS_DIR)
    if (models_dir / model / "config.json").exists():
        return models_dir / model
    for config in sorted(models_dir.glob("*/config.json")):
        try:
            if json.loads(config.read_text()).get("name") == model:
                return config.parent
        except (OSError, ValueError):
            continue
    raise SystemExit(f"no model folder {model!r} (neither a path nor a model's name under {models_dir})")


# carriage return and erase-to-end-of-line: a terminal line rewritten in place
CLEAR_LINE = "\r\033[K"


def translate_ids(model: Seq2Seq, src_ids: list[list[int]], beam_size: int = 1, batch_size: int = 128,
                  alpha: float = 0.6, max_tokens: int | None = None, max_len: int = 256,
                  on_done: Callable[[int], None] | None = None, int8: bool = False) -> list[list[int]]:
    """Decode many sentences with the serving engine, `batch_size` sentences in flight, input order kept;
    `on_done(count)` after each engine step that finished sentences. `max_len` bounds source and output tokens;
    `int8`: the exact int8 decoder step, as a model with `"int8": true` in its config.json is served on CPU."""
    params = TranslationParams(beam_size=beam_size, length_penalty=alpha, max_tokens=max_tokens)
    params.validate(max_tokens_limit=max_len)
    engine = TranslationEngine(model, max_rows=batch_size * beam_size, max_tokens_limit=max_len,
                               max_source_tokens=max_len, int8=int8)
    for i, src in enumerate(src_ids):  # one request per sentence: rows free up as sentences end
        engine.add(str(i), [src], params)
    out: list[list[int]] = [[] for _ in src_ids]
    while engine.has_work():
        finished = [o for o in engine.step() if o.finished]
        for o in finished:
            out[int(o.request_id)] = o.results[0].tokens
        if finished and on_done is not None:
            on_done(len(finished))
    return out


def translate_lines(folder: Path, lines: Iterable[str], out: TextIO, beam_size: int = 4, length_penalty: float = 0.6,
                    batch_size: int = 64, max_tokens: int | None = None, progress: TextIO | None = sys.stderr) -> int:
    """Translate every line (an empty line stays empty), writing them in input order; returns the count."""
    tr = load_translation(folder)
    lines = list(lines)
    meter = LineProgress(len(lines), progress)
    for start in range(0, len(lines), 1024):  # bounded memory for any input; the engine batches within
        chunk = lines[start:start + 1024]
        ids = translate_ids(tr.model, [tr.src.encode(line) for line in chunk], beam_size, batch_size,
                            length_penalty, max_tokens, max_len=1024, on_done=meter,
                            int8=tr.meta.get("int8") is True)  # as served
        meter.clear()
        for tokens in ids:
            out.write(tr.tgt.decode(tokens) + "\n")
        out.flush()
    if progress is not None:
        seconds = time.monotonic() - meter.t0
        progress.write(f"{CLEAR_LINE if meter.live else ''}translated {len(lines)} lines in {seconds:.1f} s "
                       f"({len(lines) / max(seconds, 1e-9):.1f} lines/s)\n")
    return len(lines)


class LineProgress:
    """"translated 120/1000 lines, 35.2 lines/s", rewritten in place at most once a second, and only on a
    terminal (as tqdm does); `clear()` erases it before anything else is written, so that the two never share
    a line when stdout and stderr are the same terminal."""

    def __init__(self, total: int, out: TextIO | None) -> None:
        self.total, self.out = total, out
        self.live = out is not None and out.isatty()
        self.t0, self.done, self.shown = time.monotonic(), 0, 0.0

    def __call__(self, n: int) -> None:
        """`n` more lines are done (translate_ids' on_done)."""
        self.done += n
        now = time.monotonic()
        if self.live and now - self.shown >= 1.0:
            self.shown = now
            rate = self.done / max(now - self.t0, 1e-9)
            self.out.write(f"{CLEAR_LINE}translated {self.done}/{self.total} lines, {rate:.1f} lines/s")
            self.out.flush()

    def clear(self) -> None:
        if self.live and self.shown:
            self.out.write(CLEAR_LINE)
            self.out.flush()


def generate(folder: Path, prompt: str, out: TextIO, params: SamplingParams) -> str:
    """Stream one generation to `out` as it decodes; returns the text."""
    lm = load_lm(folder)
    engine = LMEngine(lm.model, lm.tokenizer, max_batch_size=1, max_tokens_limit=params.max_tokens,
                      max_prompt_chars=max(len(prompt), 1), int8=lm.meta.get("int8") is True)  # as served
    engine.add("cli", prompt, params)
    text = ""
    while engine.has_work():
        for o in engine.step(num_tokens=8):
            out.write(o.text)
            out.flush()
            text += o.text
    return text


def main_translate(args) -> int:
    folder = resolve_model(args.model)
    source = open(args.input, encoding="utf-8") if args.input else sys.stdin
    sink = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        translate_lines(folder, (line.rstrip("\r\n") for line in source), sink, args.beam_size, args.length_penalty,
                        args.batch_size, args.max_tokens, None if args.quiet else sys.stderr)
    finally:
        if args.input:
            source.close()
        if args.output:
            sink.close()
    return 0


def main_generate(args) -> int:
    folder = resolve_model(args.model)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, stop=args.stop or [], seed=args.seed)
    try:
        params.validate()
    except ValueError as e:
        raise SystemExit(f"rnnserve generate: error: {e}") from None
    sys.stdout.write(args.prompt)
    generate(folder, args.prompt, sys.stdout, params)
    sys.stdout.write("\n")
    return 0
