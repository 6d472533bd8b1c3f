"""`make gpu-check`: on a machine with a CUDA GPU, the GPU tests and the GPU engine benchmarks in one run.

- the tests that need CUDA (graphs, the decode loop in a graph, devices, the int8 step's batch invariance);
- the LM engine at 1/32/256/1,024 streams (the served fp16 step and the exact int8 step, both through CUDA
  graphs) beside a plain loop over the model's own modules with `torch.multinomial`, in the same run;
- translation, greedy and beam 4, at 1/32/256/1,000 sentences in flight, with sacreBLEU.

It writes `gpu-check.json` and `gpu-check.md` (a markdown table) into --out. Without CUDA it says so and exits 2.
Runs with plain `python3` and the checkout on PYTHONPATH (no venv, no TorchServe needed).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from rnnserve.paths import DATA_DIR, MODELS_DIR

GPU_TESTS = ["tests/unit/test_graphs.py", "tests/unit/test_graphed_decode.py", "tests/unit/test_device.py"]
LM_STREAMS = (1, 32, 256, 1024)
TRANSLATION_IN_FLIGHT = (1, 32, 256, 1000)
NO_GPU = 2  # exit status without CUDA


def _sync() -> None:
    torch.cuda.synchronize()


@torch.inference_mode()
def plain_loop(model, batch: int, tokens: int, start: int) -> float:
    """tokens/s of what a user writes in an afternoon: the modules step by step, softmax, torch.multinomial."""
    device = model.embed.weight.device
    x = torch.full((batch,), start, dtype=torch.long, device=device)
    state = model.init_state(batch, device, model.embed.weight.dtype)
    out = []
    _sync()
    t0 = time.perf_counter()
    for _ in range(tokens):
        logits, _, state = model(x.unsqueeze(1), state)
        x = torch.multinomial(torch.softmax(logits[:, -1].float() / 0.8, -1), 1).squeeze(1)
        out.append(x)
    torch.stack(out).cpu()
    return batch * tokens / (time.perf_counter() - t0)


@torch.inference_mode()
def engine_lm(loaded, batch: int, tokens: int, int8: bool) -> float:
    from rnnserve.engine.lm_engine import LMEngine
    from rnnserve.engine.sampling import SamplingParams

    engine = LMEngine(loaded.model, loaded.tokenizer, max_batch_size=batch, device="cuda", cuda_graphs=True,
                      int8=int8, tokens_per_replay=32)  # as the handler runs it: 32 tokens per replay
    for i in range(batch):
        engine.add(str(i), "", SamplingParams(max_tokens=tokens, temperature=0.8, seed=i))
    engine.step(1)  # the prefill and each stream's first token, outside the timing
    _sync()
    t0 = time.perf_counter()
    while engine.has_work():
        engine.step(32)
    _sync()
    return batch * (tokens - 1) / (time.perf_counter() - t0)


def bench_lm(tokens: int, repeat: int) -> list[dict]:
    from rnnserve.models.folder import load_lm

    loaded = load_lm(MODELS_DIR / "lm-shakespeare", device=torch.device("cuda"), dtype=torch.float16)
    start = loaded.tokenizer.encode("\n")[0]
    rows = []
    for b in LM_STREAMS:
        runs: dict[str, list[float]] = {"engine_fp16": [], "engine_int8": [], "plain_loop": []}
        for _ in range(repeat):  # alternated, so a slow moment hits every variant alike
            runs["engine_fp16"].append(engine_lm(loaded, b, tokens, int8=False))
            runs["engine_int8"].append(engine_lm(loaded, b, tokens, int8=True))
            runs["plain_loop"].append(plain_loop(loaded.model, b, tokens, start))
        row = {"streams": b, **{k: round(_median(v), 1) for k, v in runs.items()}}
        row["fp16_vs_plain"] = round(row["engine_fp16"] / row["plain_loop"], 2)
        row["int8_vs_plain"] = round(row["engine_int8"] / row["plain_loop"], 2)
        rows.append(row)
        print(row, flush=True)
    return rows


def bench_translation(sentences: int) -> list[dict]:
    from rnnserve.models.folder import load_translation
    from rnnserve.offline import translate_ids
    from rnnserve.training.corpus import read_lines
    from rnnserve.training.translation import sacre_bleu

    raw = DATA_DIR / "multi30k" / "raw"
    src, refs = read_lines(raw / "test_2016_flickr.de.gz"), read_lines(raw / "test_2016_flickr.en.gz")
    rows = []
    for dtype in (torch.float16, torch.float32):
        tr = load_translation(MODELS_DIR / "translate-de-en", device=torch.device("cuda"), dtype=dtype)
        ids = [tr.src.encode(s) for s in src]
        for beam in (1, 4):
            for n in TRANSLATION_IN_FLIGHT:
                count = min(len(ids), max(n, 100) if n < 256 else len(ids))  # one at a time: 100 sentences
                _sync()
                t0 = time.perf_counter()
                out = translate_ids(tr.model, ids[:count], beam_size=beam, batch_size=n)
                _sync()
                seconds = time.perf_counter() - t0
                bleu = sacre_bleu([tr.tgt.decode(h) for h in out], refs[:count])
                row = {"precision": str(dtype).removeprefix("torch."), "beam": beam, "in_flight": n,
                       "sentences": count, "sentences_per_s": round(count / seconds, 1),
                       "sacrebleu": round(bleu["bleu"], 2) if count == len(ids) else None}
                rows.append(row)
                print(row, flush=True)
    return rows


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def _table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("-" if r.get(c) is None else str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu-check", help="folder for gpu-check.json and gpu-check.md")
    p.add_argument("--tokens", type=int, default=128, help="tokens per LM stream")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--skip-tests", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA GPU here (torch {torch.__version__}, torch.cuda.is_available() is False): "
              "run it on a machine with an NVIDIA GPU and a CUDA build of torch", file=sys.stderr)
        return NO_GPU
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tests_rc = None
    if not args.skip_tests:
        tests = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TESTS]
        tests_rc = subprocess.run(tests).returncode
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "python": platform.python_version(), "commit": _commit(),
              "tests_exit_status": tests_rc, "lm": bench_lm(args.tokens, args.repeat),
              "translation": bench_translation(1000)}
    (out / "gpu-check.json").write_text(json.dumps(result, indent=1))
    md = (f"GPU check, {result['date']}, {result['gpu']}, torch {result['torch']}, commit {result['commit']}; "
          f"GPU tests exit status {tests_rc}\n\nLM engine, tokens/s ({args.tokens} tokens per stream, median of "
          f"{args.repeat}):\n\n{_table(result['lm'])}\n\nTranslation (translate-de-en, test_2016_flickr):\n\n"
          f"{_table(result['translation'])}\n")
    (out / "gpu-check.md").write_text(md)
    print(md)
    return 0 if tests_rc in (None, 0) else 1


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
