"""Metrics through a real Prometheus server, and the dashboard's queries against what the stack exports."""
import json
import math
import re
import shutil
import subprocess
import time

import httpx
import pytest
import yaml

from rnnserve.paths import REPO_ROOT
from rnnserve.service.stack import free_ports
from tests.e2e.waits import HANG_S

pytestmark = pytest.mark.e2e

# exported by TorchServe only on hosts with a GPU
GPU_ONLY = {"GPUUtilization", "GPUMemoryUtilization", "GPUMemoryUsed"}
PROMQL_WORDS = {"sum", "by", "rate", "histogram_quantile", "clamp_min", "le", "model", "model_name", "outcome",
                "reason"}


def exported(text: str) -> set[str]:
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def queried_metrics() -> set[str]:
    board = json.loads((REPO_ROOT / "deploy/grafana/dashboards/rnnserve.json").read_text())
    names = set()
    for panel in board["panels"]:
        for target in panel["targets"]:
            expr = re.sub(r'\{[^}]*\}', "", target["expr"])  # label matchers
            expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
            expr = re.sub(r"\b\d+(\.\d+)?(e-?\d+)?\b", "", expr)  # numbers such as 1e6
            names |= {w for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", expr) if w not in PROMQL_WORDS}
    return names


def test_every_dashboard_metric_is_exported_by_the_running_stack(stack):
    with stack.client() as c:
        c.post("/v1/generate", json={"model": "lm-shakespeare", "prompt": "a", "max_tokens": 30, "stream": True})
        live = exported(c.get("/metrics").text) | exported(httpx.get(stack.ts_metrics_url).text)
    missing = queried_metrics() - live - GPU_ONLY
    assert missing == set(), f"dashboard queries metrics nobody exports: {sorted(missing)}"
    assert {"rnnserve_time_to_first_token_seconds_bucket", "rnnserve_requests_total",
            "ts_inference_requests_total"} <= live


def test_torchserve_writes_no_line_per_engine_step_and_its_metrics_still_count_the_steps(stack):
    """The worker's "Backend received inference at" (handlers/worker_io.py) and the frontend's "result=" line for
    each metrics line (log4j2.xml) are left out: one of each per engine step. The metrics themselves still count."""
    with stack.client() as c:
        r = c.post("/v1/generate", json={"model": "lm-shakespeare", "prompt": "a", "max_tokens": 30, "stream": True})
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    assert "PredictionTime" in exported(httpx.get(stack.ts_metrics_url).text)
    logs = stack.run_dir / "logs"
    model_log, ts_log = (logs / "model_log.log").read_text(), (logs / "ts_log.log").read_text()
    assert "loaded lm-shakespeare on cpu" in model_log  # the worker's other lines are written
    assert "Backend received inference at" not in model_log
    assert "TorchServe's worker trimmed: buffered reads, each request in flight decoded once" in model_log
    assert "Torchserve version" in ts_log and "result=[METRICS]" not in ts_log


@pytest.fixture
def prometheus(stack, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("Prometheus is not installed (make test installs Debian's prometheus package)")
    (port,) = free_ports(1)
    gateway = stack.url.removeprefix("http://")
    ts = stack.ts_metrics_url.removeprefix("http://").removesuffix("/metrics")
    config = {"global": {"scrape_interval": "1s"},
              "scrape_configs": [{"job_name": "rnnserve-gateway", "static_configs": [{"targets": [gateway]}]},
                                 {"job_name": "torchserve", "static_configs": [{"targets": [ts]}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def query(url: str, promql: str) -> list:
    r = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert r["status"] == "success", r
    return r["data"]["result"]


def test_prometheus_scrapes_both_and_answers_time_to_first_token(stack, prometheus):
    with stack.client() as c:
        for i in range(6):
            c.post("/v1/generate", json={"model": "lm-shakespeare", "prompt": "KING:", "max_tokens": 40,
                                         "stream": True, "seed": i})
    deadline = time.monotonic() + HANG_S  # scrapes every few seconds: only a hang reaches this
    count = []
    while time.monotonic() < deadline:
        count = query(prometheus, 'rnnserve_time_to_first_token_seconds_count{model="lm-shakespeare"}')
        if count and float(count[0]["value"][1]) >= 6:
            break
        time.sleep(1)
    assert count and float(count[0]["value"][1]) >= 6
    p50 = query(prometheus, 'histogram_quantile(0.5, sum by (le) (rnnserve_time_to_first_token_seconds_bucket'
                            '{model="lm-shakespeare"}))')
    assert 0 < float(p50[0]["value"][1]) < math.inf  # inside the histogram's buckets
    # each target has its own scrape offset, and a first scrape can run late on a busy machine: wait for both
    up: dict = {}
    while time.monotonic() < deadline + HANG_S:
        up = {r["metric"]["job"]: r["value"][1] for r in query(prometheus, "up")}
        if up == {"rnnserve-gateway": "1", "torchserve": "1"}:
            break
        time.sleep(1)
    assert up == {"rnnserve-gateway": "1", "torchserve": "1"}
    assert query(prometheus, 'ts_inference_requests_total{model_name="lm-shakespeare"}')
