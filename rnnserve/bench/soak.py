"""`rnnserve soak`: moderate load for minutes against a fresh stack, recording the resident memory of
the gateway and the TorchServe workers and the latency over time. Not a test: run it by hand.

    rnnserve soak --minutes 5 --users 8

Passes when memory after warm-up grows less than 5% and no request fails.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import tempfile
import time
from pathlib import Path
from statistics import median

import httpx
import psutil

from rnnserve.bench.sse import run_client
from rnnserve.service.stack import start_stack, stop_stack

WARMUP_FRACTION = 0.2


def memory_growth(warm: list[dict]) -> dict[str, float]:
    """Growth in % from the median of the first quarter of the samples after warm-up to the median of
    the last quarter. Medians, not the first and last samples: the JVM's resident size saw-tooths by
    ~10% with its garbage collector, and one sample caught low or high decided the verdict."""
    if len(warm) < 4:
        return {}
    q = len(warm) // 4
    out = {}
    for k in ("gateway", "workers", "java"):
        first, last = median([s[k] for s in warm[:q]]), median([s[k] for s in warm[-q:]])
        out[k] = round(100 * (last - first) / max(first, 1e-9), 2)
    return out


def cpu_seconds() -> tuple[float, float]:
    """The machine's CPU seconds so far, all and those the hypervisor stole (steal is Linux only)."""
    cpu = psutil.cpu_times()
    return sum(cpu), getattr(cpu, "steal", 0.0)


def steal_per_minute(samples: list[dict]) -> dict[int, float]:
    """% of the machine's CPU time the hypervisor stole, per minute of the run. On shared machines a
    latency that rises while memory stays flat can be this rather than the stack."""
    cpu: dict[int, float] = {}
    stolen: dict[int, float] = {}
    for a, b in itertools.pairwise(samples):
        m = int(b["t"] // 60)
        cpu[m] = cpu.get(m, 0.0) + b["cpu_s"] - a["cpu_s"]
        stolen[m] = stolen.get(m, 0.0) + b["steal_s"] - a["steal_s"]
    return {m: round(100 * stolen[m] / cpu[m], 1) for m in cpu if cpu[m] > 0}


def rss_mb(run_dir: Path, gateway_pid: int) -> dict[str, float]:
    """Resident memory of the gateway process and of every TorchServe worker of the stack, in MB."""
    out = subprocess.run(["ps", "-eww", "-o", "pid=,rss=,args="], capture_output=True, text=True, check=True).stdout
    mem = {"gateway": 0.0, "workers": 0.0, "java": 0.0}
    for line in out.splitlines():
        pid, rss, args = line.split(None, 2)
        if int(pid) == gateway_pid:
            mem["gateway"] = int(rss) / 1024
        elif str(run_dir) in args and "model_service_worker" in args:
            mem["workers"] += int(rss) / 1024
        elif str(run_dir) in args and "java" in args:
            mem["java"] = int(rss) / 1024
    return mem


async def _load(url: str, users: int, stop_at: float, latencies: list, errors: list) -> None:
    bodies = [{"model": "lm-shakespeare", "prompt": "ROMEO:\n", "max_tokens": 128, "stream": True},
              {"model": "lm-shakespeare", "prompt": "KING:", "max_tokens": 64},
              {"model": "translate-de-en", "text": "Zwei Hunde spielen im Schnee.", "beam_size": 4}]
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        async def user(i: int) -> None:
            n = 0
            while time.monotonic() < stop_at:
                body = bodies[(i + n) % len(bodies)]
                path = "/v1/translate" if "text" in body else "/v1/generate"
                t0 = time.monotonic()
                try:
                    r = await c.post(path, json=body)
                    if r.status_code != 200 or '"error"' in r.text:
                        errors.append((path, r.status_code, r.text[:200]))
                except httpx.HTTPError as e:
                    errors.append((path, None, repr(e)))
                latencies.append((time.monotonic(), time.monotonic() - t0))
                n += 1

        await asyncio.gather(*(user(i) for i in range(users)))


def soak(minutes: float, users: int, out: Path | None) -> dict:
    samples = []
    latencies: list = []
    errors: list = []
    with tempfile.TemporaryDirectory() as tmp:
        stack = start_stack(Path(tmp))
        try:
            t0 = time.monotonic()
            stop_at = t0 + minutes * 60

            async def run() -> None:
                load = asyncio.create_task(_load(stack.url, users, stop_at, latencies, errors))
                while not load.done():
                    cpu_s, steal_s = cpu_seconds()
                    samples.append({"t": round(time.monotonic() - t0, 1), **rss_mb(stack.run_dir, stack.proc.pid),
                                    "cpu_s": cpu_s, "steal_s": steal_s})
                    await asyncio.sleep(5)
                await load

            run_client(run())
        finally:
            stop_stack(stack)
    warm = [s for s in samples if s["t"] >= WARMUP_FRACTION * minutes * 60]
    growth = memory_growth(warm)
    lat = sorted(d for _, d in latencies)
    buckets = {}
    for at, d in latencies:
        minute = int((at - (latencies[0][0] if latencies else 0)) // 60)
        buckets.setdefault(minute, []).append(d)
    per_minute = {m: round(sorted(v)[len(v) // 2] * 1000, 1) for m, v in sorted(buckets.items())}
    result = {"minutes": minutes, "users": users, "requests": len(latencies), "errors": len(errors),
              "first_errors": errors[:3], "memory_growth_after_warmup_percent": growth,
              "memory_mb_first_last": [warm[0], warm[-1]] if warm else [],
              "growth_first_last_sample_percent": {  # the older, single-sample measure, for comparison
                  k: round(100 * (warm[-1][k] - warm[0][k]) / max(warm[0][k], 1e-9), 2)
                  for k in ("gateway", "workers", "java")} if len(warm) >= 2 else {},
              "latency_p50_ms": round(lat[len(lat) // 2] * 1000, 1) if lat else None,
              "latency_p99_ms": round(lat[int(0.99 * (len(lat) - 1))] * 1000, 1) if lat else None,
              "latency_p50_ms_per_minute": per_minute,
              "steal_percent_per_minute": steal_per_minute(samples),
              "passed": not errors and bool(growth) and all(v < 5 for v in growth.values())}
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"result": result, "samples": samples}, indent=1))
    return result


def main(args) -> int:
    result = soak(args.minutes, args.users, Path(args.out) if args.out else None)
    print(json.dumps(result, indent=1))
    return 0 if result["passed"] else 1
