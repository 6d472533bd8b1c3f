"""Faults through the real stack: a worker killed mid-stream, SIGTERM under load, clients that never read."""
import json
import os
import signal
import subprocess
import threading
import time

import httpx
import pytest

from rnnserve.service.stack import start_stack, stop_stack

pytestmark = pytest.mark.e2e

LONG = {"model": "lm-shakespeare", "prompt": "ROMEO:", "max_tokens": 2048, "stream": True}


def worker_pids(stack, model: str) -> list[int]:
    out = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True).stdout
    # a worker's socket lives in the stack's run dir; its log names the model it loaded
    pids = [int(line.split()[0]) for line in out.splitlines()
            if "model_service_worker" in line and str(stack.run_dir) in line]
    return pids


def lm_worker_pid(stack) -> int:
    """The language model's worker: TorchServe logs each worker's pid with the model it loaded."""
    log = (stack.run_dir / "logs" / "model_log.log").read_text()
    pids = [int(line.rsplit("pid ", 1)[1]) for line in log.splitlines()
            if "loaded lm-shakespeare on" in line and "pid " in line]
    assert pids[-1] in worker_pids(stack, "lm-shakespeare")
    return pids[-1]


def read_events(url: str, body: dict, out: list, timeout: float = 60) -> None:
    t0 = time.monotonic()
    try:
        with httpx.Client(base_url=url, timeout=timeout) as c, c.stream("POST", "/v1/generate", json=body) as r:
            if r.status_code != 200:  # failed before its first frame: a plain error answer
                r.read()
                out.append((r.status_code, [json.dumps(r.json()), "[DONE]"], time.monotonic() - t0))
                return
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        out.append((r.status_code, events, time.monotonic() - t0))
    except httpx.HTTPError as e:
        out.append((None, [repr(e)], time.monotonic() - t0))


@pytest.fixture
def fresh(tmp_path):
    s = start_stack(tmp_path, extra_env={"RNNSERVE_REQUEST_TIMEOUT_S": "60", "RNNSERVE_READY_PROBE_TIMEOUT_S": "1"})
    yield s
    stop_stack(s)


def test_killed_worker_ends_every_stream_with_an_error_then_recovers(fresh):
    results: list = []
    threads = [threading.Thread(target=read_events, args=(fresh.url, {**LONG, "seed": i}, results)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    statuses: list[int] = []
    polling = threading.Event()

    def poll_readyz() -> None:  # watch /readyz through the outage and the recovery
        with fresh.client() as c:
            while not polling.is_set():
                statuses.append(c.get("/readyz").status_code)
                time.sleep(0.1)

    poller = threading.Thread(target=poll_readyz)
    poller.start()
    pid = lm_worker_pid(fresh)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    # the other model's worker is untouched and keeps serving during the outage
    with fresh.client() as c:
        r = c.post("/v1/translate", json={"model": "translate-de-en", "text": "Ein Hund rennt.", "beam_size": 1})
        assert r.status_code == 200 and "dog" in r.json()["translations"][0]["tokens"]
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 3
    for status, events, _ in results:
        # an error event ends a stream that had started; one that had not gets an error status
        assert status in (200, 502, 503) and events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err["code"] in (502, 503) and err["type"] in ("upstream_error", "unavailable_error"), err
    assert time.monotonic() - killed_at < 15  # no hung connection
    # TorchServe restarts the worker; readiness comes back and requests succeed
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not (503 in statuses and statuses[-1] == 200):
        time.sleep(0.5)
    polling.set()
    poller.join()
    assert 503 in statuses  # /readyz reported the outage ...
    assert statuses[-1] == 200  # ... and the recovery
    with fresh.client() as c:
        r = c.post("/v1/generate", json={"model": "lm-shakespeare", "prompt": "a", "max_tokens": 5})
        assert r.status_code == 200 and len(r.json()["text"]) == 5


def test_sigterm_under_load_ends_streams_and_leaves_no_process(fresh):
    results: list = []
    threads = [threading.Thread(target=read_events, args=(fresh.url, {**LONG, "seed": i}, results)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    fresh.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=40)
    assert len(results) == 3
    for status, events, seconds in results:
        assert seconds < 30
        # each stream either ended properly or was told it failed; none hangs
        assert events and (events[-1] == "[DONE]" or status is None)
    assert fresh.proc.wait(timeout=60) == 0
    out = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
    assert str(fresh.run_dir) not in out


def test_a_client_that_never_reads_is_bounded_and_frees_its_slot(fresh):
    with httpx.Client(base_url=fresh.url, timeout=60) as c:
        with c.stream("POST", "/v1/generate", json={**LONG, "max_tokens": 600}) as r:
            assert r.status_code == 200
            time.sleep(5)  # never read: generation is bounded by max_tokens and the deadline
        deadline = time.monotonic() + 20
        running = None
        while time.monotonic() < deadline:
            running = [line for line in c.get("/metrics").text.splitlines()
                       if line.startswith('rnnserve_requests_running{model="lm-shakespeare"}')]
            if running and running[0].endswith(" 0.0"):
                break
            time.sleep(0.3)
        assert running and running[0].endswith(" 0.0")
        ok = c.post("/v1/generate", json={"model": "lm-shakespeare", "prompt": "b", "max_tokens": 4})
        assert ok.status_code == 200
