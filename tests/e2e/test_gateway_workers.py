"""Two gateway processes on one port (RNNSERVE_GATEWAY_WORKERS=2) over one TorchServe, on the synthetic model:
admission bounds, /metrics and readiness are the whole service's wherever a request lands. TorchServe's
inference API listens on a Unix socket here (RNNSERVE_TS_INFERENCE_SOCKET), which both processes stream through.

Streams are paced (waits.PACED): a 2,048-token stream holds its slot for over 40 s on any machine. Each request
below opens its own connection, so the kernel hands them to either process.
"""
import shutil
import threading

import httpx
import psutil
import pytest

from rnnserve.bench.serving import SYNTHETIC, synthetic_models_dir
from rnnserve.paths import MODELS_DIR
from rnnserve.service.stack import start_stack, stop_stack
from tests.e2e.waits import PACED, metric, wait_for

pytestmark = pytest.mark.e2e

LM = "lm-shakespeare"
LONG = {"model": SYNTHETIC, "prompt": "ROMEO:", "max_tokens": 2048, "stream": True}


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    models = synthetic_models_dir(tmp)
    shutil.copytree(MODELS_DIR / LM, models / LM)  # a real model, for states
    s = start_stack(tmp, models_dir=models, extra_env={
        "RNNSERVE_GATEWAY_WORKERS": "2", "RNNSERVE_MAX_RUNNING_PER_MODEL": "2", "RNNSERVE_MAX_WAITING_PER_MODEL": "1",
        "RNNSERVE_TS_INFERENCE_SOCKET": str(tmp / "ts.sock"), **PACED})
    yield s
    stop_stack(s)


def fresh(stack) -> httpx.Client:
    """A client whose every request opens a new connection."""
    return httpx.Client(base_url=stack.url, timeout=60, headers={"Connection": "close"})


def gauge(stack, name: str) -> float:
    with fresh(stack) as c:
        return metric(c, name, model=SYNTHETIC)


def test_the_service_runs_two_gateway_processes_that_answer_ready(two):
    gateways = [p for p in psutil.Process(two.proc.pid).children(recursive=True)
                if "multiprocessing.spawn" in " ".join(p.cmdline())]
    assert len(gateways) == 2
    # each process proves readiness with its own probe; once both have, every answer says ready
    with fresh(two) as c:
        wait_for(lambda: all(c.get("/readyz").status_code == 200 for _ in range(8)), "both processes to be ready")
        for _ in range(8):
            r = c.get("/readyz")
            assert r.status_code == 200 and r.json()["models"] == {SYNTHETIC: "ready", LM: "ready"}, r.text


def test_both_processes_stream_through_torchserves_unix_socket(two):
    sock = str((two.run_dir.parent / "ts.sock").resolve())
    assert two.ts_inference_url == f"unix:{sock}"
    assert f"inference_address=unix:{sock}" in (two.run_dir / "config.properties").read_text().splitlines()
    java = two.processes()["frontend"][0]
    assert sock in [c.laddr for c in java.net_connections("unix")]  # TorchServe listens there, on no TCP port
    # nothing answers inference over TCP, so every answer below came through the socket, from either process
    body = {"model": LM, "prompt": "ROMEO:", "max_tokens": 12, "seed": 3}
    with fresh(two) as c:
        answers = [c.post("/v1/generate", json=body) for _ in range(6)]
    assert [r.status_code for r in answers] == [200] * 6, answers[-1].text
    assert len({r.json()["text"] for r in answers}) == 1 and answers[0].json()["usage"]["completion_tokens"] == 12


def test_admission_bounds_hold_for_the_whole_service(two):
    first_events: list[threading.Event] = [threading.Event() for _ in range(3)]
    leave = threading.Event()
    statuses: dict[int, int] = {}

    def stream(i: int) -> None:
        with fresh(two) as c, c.stream("POST", "/v1/generate", json=LONG) as r:
            statuses[i] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    first_events[i].set()
                if leave.is_set():
                    return

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    for e in first_events[:2]:
        assert e.wait(60), "a stream within the bound did not start"
    # the third waits for a slot, wherever it landed
    third = threading.Thread(target=stream, args=(2,), daemon=True)
    third.start()
    wait_for(lambda: gauge(two, "rnnserve_requests_waiting") == 1, "the third request to queue")
    assert gauge(two, "rnnserve_requests_running") == 2
    # two running and one queued in the whole service: every further request is refused, in either process
    with fresh(two) as c:
        for _ in range(6):
            r = c.post("/v1/generate", json={**LONG, "stream": False})
            assert r.status_code == 429, r.text
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == 429
    assert not first_events[2].is_set()
    leave.set()  # the first two leave at their next event; the queued one gets a slot, whichever process holds it
    for t in threads:
        t.join(60)
    assert first_events[2].wait(60), "the queued request never started"
    assert statuses == {0: 200, 1: 200, 2: 200}
    third.join(60)
    wait_for(lambda: gauge(two, "rnnserve_requests_running") == 0, "every slot to be released")


def test_metrics_report_the_whole_service(two):
    def served() -> float:
        with fresh(two) as c:
            text = c.get("/metrics").text
        want = f'rnnserve_requests_total{{model="{SYNTHETIC}",outcome="length",route="generate"}}'
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(want + " "))

    before = served()
    with fresh(two) as c:
        for _ in range(8):
            r = c.post("/v1/generate", json={"model": SYNTHETIC, "prompt": "a", "max_tokens": 3, "seed": 0})
            assert r.status_code == 200 and r.json()["text"] == "Now"
    # every scrape, whichever process answers it, counts all eight
    assert [served() - before for _ in range(6)] == [8.0] * 6


def test_a_state_signed_by_one_process_is_accepted_by_every_one_and_sessions_are_refused(two):
    with fresh(two) as c:
        first = c.post("/v1/generate", json={"model": LM, "prompt": "ROMEO:", "max_tokens": 4, "temperature": 0,
                                             "return_state": True}).json()
        texts = set()
        for _ in range(6):
            r = c.post("/v1/generate", json={"model": LM, "prompt": "", "max_tokens": 4, "temperature": 0,
                                             "state": first["state"]})
            assert r.status_code == 200, r.text
            texts.add(r.json()["text"])
        assert len(texts) == 1  # greedy from the same state, whichever process verified it
        for _ in range(3):
            r = c.post("/v1/generate", json={"model": LM, "prompt": "a", "max_tokens": 2, "session": "s1"})
            assert r.status_code == 400
            assert r.json() == {"error": {
                "message": "sessions are held in one gateway process's memory and this service runs 2 "
                           "(RNNSERVE_GATEWAY_WORKERS); set RNNSERVE_SESSION_STORE (Redis) to share them, or continue "
                           "from a returned state instead (`return_state`, then `state`)",
                "type": "invalid_request_error", "param": "session", "code": 400}}
            assert c.get("/v1/sessions").status_code == 400
