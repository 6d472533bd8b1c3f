"""`rnnserve bench serving`: the serving path alone, on a synthetic language model.

    rnnserve bench serving --concurrency 64,256,1024 --tokens 256 --token-ms 1

The model is lm-shakespeare's folder served with `"engine": "synthetic"` (rnnserve/engine/synthetic.py):
the real gateway, TorchServe and LM handler, with an engine that makes its tokens at no CPU cost, a step of
the whole batch taking `--token-ms` of wall time (a fast GPU's; 0: none). The engine's ceiling is then
min(streams, batch) x 1000 / token_ms tokens/s; `vs_engine` is the share of it the stack delivers. Whatever the
stack spends is the path's own: per level, tokens/s, events/s, time to first token and inter-token
latency, errors by status, and the CPU time per streamed token of every process (the gateway's, TorchServe's
frontend, the worker and this client). Each run of a level sends bursts of that many streams until about
1,024 requests went out; medians of `--repeat` runs. The machine's speed swings: compare figures measured
in the same run.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

from rnnserve.bench.baselines import PROMPTS, _median, _ms, _pct, _write, print_table
from rnnserve.bench.sse import read_stream, run_client
from rnnserve.bench.warmup import jvm_pid, warm_until_compiled
from rnnserve.paths import MODELS_DIR
from rnnserve.service.stack import Stack, start_stack, stop_stack

SYNTHETIC = "lm-synthetic"
WARMUP_ROUNDS = 3


def synthetic_models_dir(tmp: Path, token_ms: float = 0.0, source: Path = MODELS_DIR / "lm-shakespeare") -> Path:
    """A models folder holding one model, `lm-synthetic`: `source` served by the synthetic engine, whose
    decode step takes `token_ms`."""
    models = tmp / "models"
    models.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, models / SYNTHETIC)
    cfg = json.loads((models / SYNTHETIC / "config.json").read_text())
    (models / SYNTHETIC / "config.json").write_text(json.dumps({**cfg, "name": SYNTHETIC, "engine": "synthetic",
                                                                   "synthetic_token_ms": token_ms}))
    return models


@dataclass
class Run:
    streams: int
    tokens: int = 0
    events: int = 0
    completed: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)  # HTTP status (or "stream" for an error event) -> count


async def _stream(session: aiohttp.ClientSession, url: str, body: dict, run: Run) -> None:
    t0 = time.perf_counter()
    try:
        async with session.post(url, json=body) as r:
            if r.status != 200:
                run.errors[str(r.status)] += 1
                await r.read()
                return
            got = await read_stream(r, t0)
    except (TimeoutError, aiohttp.ClientError) as e:
        run.errors[type(e).__name__] += 1
        return
    run.events += got.events
    run.ttft += [] if got.ttft is None else [got.ttft]
    run.itl += got.itl
    if got.error:
        run.errors["stream"] += 1
    elif got.finished:
        run.tokens += got.completion_tokens
        run.completed += 1


async def streams(url: str, model: str, n: int, tokens: int, bursts: int = 1) -> Run:
    """`bursts` times, one after the other: `n` streamed generations sent at once."""
    run = Run(n)
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=n + 4)) as session:
        t0 = time.perf_counter()
        for _ in range(bursts):
            await asyncio.gather(*(
                _stream(session, f"{url}/v1/generate",
                        {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens, "seed": i,
                         "stream": True}, run) for i in range(n)))
        run.seconds = time.perf_counter() - t0
    return run


def stack_processes(stack: Stack) -> dict[str, list[psutil.Process]]:
    """The stack's processes by role (Stack.processes), and this client."""
    return {**stack.processes(), "client": [psutil.Process()]}


def cpu_seconds(roles: dict[str, list[psutil.Process]]) -> dict[str, float]:
    out = {}
    for role, procs in roles.items():
        total = 0.0
        for p in procs:
            try:
                total += sum(p.cpu_times()[:2])
            except psutil.Error:
                pass
        out[role] = total
    return out


def measure(stack: Stack, model: str, n: int, tokens: int, ceiling: float | None = None, requests: int = 1024) -> dict:
    """Bursts of `n` streams until about `requests` were sent: every level carries the same work, so that the
    processes' fixed background CPU (the JVM's compiler and collector) weighs the same in each."""
    roles = stack_processes(stack)
    before = cpu_seconds(roles)
    run = run_client(streams(stack.url, model, n, tokens, bursts=max(1, round(requests / n))))
    after = cpu_seconds(roles)
    per_token = {f"{role}_us_per_token": (1e6 * (after[role] - before[role]) / run.tokens if run.tokens else None)
                 for role in roles}
    gw, fe = per_token["gateway_us_per_token"], per_token["frontend_us_per_token"]
    return {"streams": n, "completed": run.completed, "tokens_per_s": run.tokens / run.seconds,
            "vs_engine": run.tokens / run.seconds / ceiling if ceiling else None,
            "events_per_s": run.events / run.seconds,
            "tokens_per_event": run.tokens / run.events if run.events else None,
            "ttft_p50_ms": _ms(_pct(run.ttft, 50)), "ttft_p99_ms": _ms(_pct(run.ttft, 99)),
            "itl_p50_ms": _ms(_pct(run.itl, 50)), "itl_p99_ms": _ms(_pct(run.itl, 99)),
            **per_token, "gateway_plus_frontend_us_per_token": gw + fe if gw is not None and fe is not None else None,
            "errors": dict(run.errors)}


def summarize(runs: list[dict]) -> dict:
    """Medians of every figure over the runs of one level; errors summed."""
    row: dict = {"streams": runs[0]["streams"], "runs": len(runs)}
    for key in runs[0]:
        if key in row or key == "errors":
            continue
        m = _median([r[key] for r in runs])
        row[key] = (round(m, 3) if key == "vs_engine" else round(m, 1)) if isinstance(m, float) else m
    errors: Counter = Counter()
    for r in runs:
        errors.update(r["errors"])
    row["errors"] = " ".join(f"{k}:{v}" for k, v in sorted(errors.items())) or "0"
    return row


COLUMNS = ["streams", "completed", "tokens_per_s", "vs_engine", "events_per_s", "tokens_per_event", "ttft_p50_ms",
           "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "gateway_us_per_token", "frontend_us_per_token",
           "worker_us_per_token", "client_us_per_token", "gateway_plus_frontend_us_per_token", "errors"]


def bench_serving(levels: list[int], tokens: int, out: Path | None, repeat: int = 3, token_ms: float = 1.0,
                  extra_env: dict | None = None) -> list[dict]:
    from rnnserve.service.archive import GPU_SETTINGS, MODEL_CONFIGS, archive_profile

    batch = (GPU_SETTINGS if archive_profile() == "gpu" else MODEL_CONFIGS)["lm"]["batchSize"]
    rows = []
    top = max(levels)
    env = {"RNNSERVE_REQUEST_TIMEOUT_S": "900", "RNNSERVE_MAX_RUNNING_PER_MODEL": str(top),
           "RNNSERVE_MAX_WAITING_PER_MODEL": str(top), **(extra_env or {})}
    with tempfile.TemporaryDirectory() as tmp:
        stack = start_stack(Path(tmp), models_dir=synthetic_models_dir(Path(tmp), token_ms), extra_env=env)
        try:
            # TorchServe's JVM compiles its hot paths over the first few thousand frames (warmup.py)
            warm = warm_until_compiled(lambda: run_client(streams(stack.url, SYNTHETIC, min(256, top), tokens)),
                                       jvm_pid(stack.processes()), min_bursts=WARMUP_ROUNDS)
            for n in levels:
                ceiling = min(n, batch) * 1000 / token_ms if token_ms else None
                rows.append(summarize([measure(stack, SYNTHETIC, n, tokens, ceiling) for _ in range(repeat)]))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            stop_stack(stack)
    print_table(rows, COLUMNS)
    _write(out, {"serving": rows, "tokens": tokens, "repeat": repeat, "token_ms": token_ms, "batch": batch,
                 "env": env, "warm_up": warm})
    return rows


def main(args) -> int:
    levels = [int(x) for x in args.concurrency.split(",")]
    bench_serving(levels, args.tokens, Path(args.out) if args.out else None, args.repeat, args.token_ms)
    return 0
