"""`rnnserve loadtest`: locust, headless, against a running stack; CSV and HTML reports in a results
folder and a summary table (requests/s, output tokens/s, TTFT / ITL / end-to-end percentiles, errors)."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from rnnserve.paths import REPO_ROOT
from rnnserve.service.settings import is_loopback

LOCUSTFILE = REPO_ROOT / "load_tests" / "locustfile.py"


def _loopback(url: str) -> bool:
    return is_loopback(urlparse(url).hostname or "")


def run_locust(host: str, users: int, run_time: str, out: Path, arrival_rate: float = 0.0, weights: str | None = None,
               max_requests: int = 0, max_tokens: int = 128, api_key: str = "", stop_timeout: int = 60) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, RNNSERVE_LOAD_ARRIVAL_RATE=str(arrival_rate), RNNSERVE_LOAD_MAX_REQUESTS=str(max_requests),
               RNNSERVE_LOAD_MAX_TOKENS=str(max_tokens))
    if weights:
        env["RNNSERVE_LOAD_WEIGHTS"] = weights
    if api_key:
        env["RNNSERVE_LOAD_API_KEY"] = api_key
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host, "-u", str(users),
           "-r", str(users), "-t", run_time, "--stop-timeout", str(stop_timeout), "--csv", str(out / "locust"),
           "--html", str(out / "report.html"), "--only-summary", "--loglevel", "WARNING"]
    with open(out / "locust.log", "wb") as log:
        subprocess.run(cmd, env=env, cwd=REPO_ROOT, check=False, stdout=log, stderr=subprocess.STDOUT)
    return out


def summarize(out: Path) -> dict:
    """Read locust's CSVs into one summary (response times in ms)."""
    def read(name: str, optional: bool = False) -> list[dict]:
        if optional and not (out / name).exists():
            return []
        with open(out / name, newline="") as f:
            return list(csv.DictReader(f))

    stats = read("locust_stats.csv")
    failures, history = read("locust_failures.csv", True), read("locust_stats_history.csv", True)
    agg = next(r for r in stats if r["Name"] == "Aggregated")
    seconds = max(1e-9, (int(history[-1]["Timestamp"]) - int(history[0]["Timestamp"]))) if len(history) > 1 else None
    requests = [r for r in stats if r["Type"] in ("POST", "GET")]
    n_requests = sum(int(r["Request Count"]) for r in requests)
    n_failures = sum(int(r["Failure Count"]) for r in requests)
    tokens = sum(int(float(r["Average Content Size"]) * int(r["Request Count"]))
                 for r in stats if r["Type"] == "TOKENS")

    def pct(kind: str, p: str) -> float | None:
        rows = [r for r in stats if r["Type"] == "SSE" and r["Name"].startswith(kind)]
        if not rows:
            return None
        return max(float(r[p]) for r in rows if r[p] not in ("N/A", ""))

    def e2e(p: str) -> float | None:
        vals = [float(r[p]) for r in requests if r[p] not in ("N/A", "")]
        return max(vals) if vals else None

    by_reason: dict[str, int] = {}
    for f in failures:
        reason = f["Error"].split("(")[0].strip().removeprefix("CatchResponseError").strip("('\") ")
        by_reason[reason] = by_reason.get(reason, 0) + int(f["Occurrences"])
    return {
        "requests": n_requests, "failures": n_failures,
        "requests_per_s": round(n_requests / seconds, 2) if seconds else float(agg["Requests/s"]),
        "output_tokens_per_s": round(tokens / seconds, 1) if seconds else None,
        "ttft_ms": {p: pct("TTFT", f"{p}%") for p in ("50", "90", "99")},
        "itl_ms": {p: pct("ITL", f"{p}%") for p in ("50", "90", "99")},
        "e2e_ms": {p: e2e(f"{p}%") for p in ("50", "90", "99")},
        "errors": by_reason,
    }


def print_summary(s: dict) -> None:
    print(f"requests {s['requests']} (failed {s['failures']}), {s['requests_per_s']} req/s, "
          f"{s['output_tokens_per_s']} output tokens/s")
    print("| metric | p50 ms | p90 ms | p99 ms |\n|---|---|---|---|")
    for name, key in (("time to first token", "ttft_ms"), ("inter-token latency", "itl_ms"),
                      ("end to end (worst route)", "e2e_ms")):
        print(f"| {name} | " + " | ".join(str(s[key][p]) for p in ("50", "90", "99")) + " |")
    print("errors:", s["errors"] or "none")


def main(args) -> int:
    if not _loopback(args.host) and not args.allow_remote:
        raise SystemExit(f"{args.host} is not a loopback address; pass --allow-remote to load it")
    out = Path(args.out or REPO_ROOT / "results" / time.strftime("loadtest-%Y%m%d-%H%M%S"))
    run_locust(args.host, args.users, args.run_time, out, args.arrival_rate, args.weights, args.max_requests,
               args.max_tokens, os.environ.get("RNNSERVE_LOAD_API_KEY", ""))
    summary = summarize(out)
    print_summary(summary)
    print(f"reports: {out}/report.html, {out}/locust_stats.csv")
    return 0
