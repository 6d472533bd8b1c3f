"""A short locust run against the real stack: no 5xx, and the gateway counted every request."""
import pytest

from rnnserve.bench.loadtest import run_locust, summarize

pytestmark = pytest.mark.e2e


def total_requests(client) -> tuple[float, float]:
    """(requests the gateway finished, requests cut because their client went away)."""
    done = cut = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("rnnserve_requests_total{"):
            value = float(line.rsplit(" ", 1)[1])
            if 'outcome="cancelled"' in line:
                cut += value
            else:
                done += value
    return done, cut


def test_locust_smoke_run(stack, tmp_path):
    weights = "stream=2,generate=1,openai=1"
    if "translate-de-en" in {m["id"] for m in stack.client().get("/v1/models").json()["data"]}:
        weights += ",translate=2"
    with stack.client() as c:
        before = total_requests(c)
        out = run_locust(stack.url, users=4, run_time="300s", out=tmp_path / "load", weights=weights, max_tokens=48,
                         max_requests=16)
        after = total_requests(c)
    s = summarize(out)
    assert s["requests"] == 16, (out / "locust.log").read_text()[-2000:]
    assert s["failures"] == 0, s["errors"]
    assert s["ttft_ms"]["50"] is not None and s["itl_ms"]["50"] is not None
    assert s["output_tokens_per_s"] > 0
    assert after == (before[0] + 16, before[1])  # every request counted once, none cut
    assert (out / "report.html").exists()


def test_locust_conversations(stack, tmp_path):
    """Conversation users continue sessions and returned states; their TTFT entries are their own."""
    out = run_locust(stack.url, users=2, run_time="300s", out=tmp_path / "load", weights="conversation=1",
                     max_tokens=16, max_requests=6)
    s = summarize(out)
    assert s["requests"] == 6 and s["failures"] == 0, s["errors"]
    names = (out / "locust_stats.csv").read_text()
    # 6 turns of 2 users: at least one user took a session turn and then a state turn
    assert ",TTFT conversation session," in names and ",TTFT conversation state," in names
