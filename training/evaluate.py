"""`rnnserve evaluate`: the quality figures of a model folder on any text or line-aligned files."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import TextIO

import torch

from rnnserve.engine.lm_engine import EMPTY_PROMPT
from rnnserve.models.decode import decode_step
from rnnserve.models.folder import load_lm, load_translation
from rnnserve.offline import LineProgress, resolve_model, translate_ids
from rnnserve.text import lowercase_tokenized
from rnnserve.training.corpus import DataError, read_lines
from rnnserve.training.lm import evaluate_lm
from rnnserve.training.translation import corpus_bleu, sacre_bleu


def evaluate_text(folder: Path, text_file: Path, int8: bool = False) -> dict:
    lm = load_lm(folder)
    read_lines(text_file)  # names the first line that is not UTF-8
    text = text_file.read_text(encoding="utf-8")
    # the file as it is (a final line break is a token too), read after a line break as /v1/score reads a text:
    # every token of it is predicted, the first from the line break (EMPTY_PROMPT, one token)
    ids = torch.tensor(lm.tokenizer.encode(EMPTY_PROMPT) + lm.tokenizer.encode(text), dtype=torch.long)
    batch = max(1, min(32, (len(ids) - 1) // 256))  # short texts: fewer, longer streams
    loss = evaluate_lm(lm.model, ids, batch_size=batch)
    result = {"model": lm.meta.get("name", folder.name), "characters": len(text), "loss": loss,
              "perplexity": math.exp(loss), "bits_per_char": loss / math.log(2)}
    if int8:
        result.update(int8_check(lm.model, ids, batch))
    return result


INT8_MAX_DELTA = 0.01  # nats per character: what int8 may cost before it stays off


def int8_check(model, ids: torch.Tensor, streams: int) -> dict:
    """The loss of `ids` through the fp32 and the int8 decode steps, and whether int8 keeps quality."""
    fp32 = step_loss(decode_step(model), model, ids, streams)
    q = step_loss(decode_step(model, int8=True), model, ids, streams)
    return {"loss_decode_step": fp32, "loss_int8": q, "int8_delta": q - fp32,
            "int8_keeps_quality": q - fp32 <= INT8_MAX_DELTA}


@torch.inference_mode()
def step_loss(step, model, ids: torch.Tensor, streams: int) -> float:
    """Mean cross-entropy of the text read through a serving decode step, token by token, in `streams`
    parallel slices (the same slices as `evaluate_lm`): what the served model's arithmetic gives."""
    n = (len(ids) - 1) // streams
    data = ids[: n * streams + 1]
    x = torch.stack([data[i * n: i * n + n] for i in range(streams)])  # (S, n)
    y = torch.stack([data[i * n + 1: i * n + n + 1] for i in range(streams)])
    state = model.init_state(streams)
    total = 0.0
    for t in range(n):
        logits, state = step(x[:, t], state)
        total += float(torch.nn.functional.cross_entropy(logits.float(), y[:, t], reduction="sum"))
    return total / (n * streams)


def evaluate_translation(folder: Path, src_file: Path, ref_file: Path, beam_size: int, alpha: float,
                         progress: TextIO | None = None, int8: bool = False) -> dict:
    """sacreBLEU's default BLEU (cased, 13a, on detokenized output) with its signature, and chrF; then BLEU on
    lowercased Moses tokens (hypotheses and references alike), comparable with published Multi30k results.
    The decoder step is the served one (int8 where config.json says `"int8": true`); with `int8`, the same
    figures through the fp32 and the int8 decoder steps, and whether int8 keeps quality (at most
    INT8_MAX_BLEU_DROP sacreBLEU below fp32)."""
    tr = load_translation(folder)
    src, refs = read_lines(src_file), read_lines(ref_file)
    if len(src) != len(refs):
        raise DataError(f"{src_file} has {len(src)} lines but {ref_file} has {len(refs)}")
    served_int8 = tr.meta.get("int8") is True
    result: dict = {"model": tr.meta.get("name", folder.name)}
    for step_int8 in ([False, True] if int8 else [served_int8]):
        figures = _translation_figures(tr, src, refs, beam_size, alpha, step_int8, progress)
        if not int8:
            result.update(figures)
            result["int8"] = step_int8
        else:
            result["int8" if step_int8 else "fp32"] = figures
    if int8:
        drop = result["fp32"]["bleu"] - result["int8"]["bleu"]
        result.update({"int8_bleu_drop": round(drop, 2), "int8_keeps_quality": drop <= INT8_MAX_BLEU_DROP,
                       "served_int8": served_int8})
    result.update({"sentences": len(src), "beam_size": beam_size, "length_penalty": alpha})
    return result


INT8_MAX_BLEU_DROP = 0.3  # sacreBLEU points the int8 decoder step may cost before it stays off


def _translation_figures(tr, src: list[str], refs: list[str], beam_size: int, alpha: float, int8: bool,
                         progress: TextIO | None) -> dict:
    t0 = time.perf_counter()
    meter = LineProgress(len(src), progress)  # on a terminal only, erased before the result is printed
    out = translate_ids(tr.model, [tr.src.encode(s) for s in src], beam_size=beam_size, alpha=alpha, on_done=meter,
                        int8=int8)
    meter.clear()
    seconds = time.perf_counter() - t0
    hyps = [tr.tgt.decode(h) for h in out]
    lang = (tr.meta.get("languages") or {}).get("target", "en")
    lc_bleu, lc_chrf = corpus_bleu([lowercase_tokenized(h, lang) for h in hyps],
                                   [lowercase_tokenized(r, lang) for r in refs])
    return {**sacre_bleu(hyps, refs), "bleu_lowercased_tokenized": lc_bleu, "seconds": seconds}


def main(args) -> int:
    folder = resolve_model(args.model)
    try:
        return _evaluate(args, folder)
    except DataError as e:
        raise SystemExit(f"rnnserve evaluate: error: {e}") from None


def _evaluate(args, folder: Path) -> int:
    if args.text_file:
        result = evaluate_text(folder, Path(args.text_file), int8=getattr(args, "int8", False))
    elif args.src_file and args.ref_file:
        result = evaluate_translation(folder, Path(args.src_file), Path(args.ref_file), args.beam_size,
                                      args.length_penalty, progress=sys.stderr, int8=getattr(args, "int8", False))
    else:
        raise SystemExit("give --text-file (language models) or --src-file and --ref-file (translation)")
    print(json.dumps(result, indent=1))
    return 0
