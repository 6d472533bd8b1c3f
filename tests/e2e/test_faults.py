"""Faults through the real stack: a worker killed mid-stream, SIGTERM under load, clients that never read.

The stack's streams are paced (waits.PACED), so they are still running whenever a fault strikes."""
import json
import os
import signal
import subprocess
import threading
import time

import httpx
import pytest

from rnnserve.service.stack import start_stack, stop_stack
from tests.e2e.waits import PACED, metric, wait_for

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


def read_events(url: str, body: dict, out: list, started: list | None = None, timeout: float = 60) -> None:
    """Stream a generation; (status, events, seconds) goes to `out`, and the body's seed to `started` once
    its first event has arrived."""
    t0 = time.monotonic()
    try:
        with httpx.Client(base_url=url, timeout=timeout) as c, c.stream("POST", "/v1/generate", json=body) as r:
            if r.status_code != 200:  # failed before its first frame: a plain error answer
                r.read()
                out.append((r.status_code, [json.dumps(r.json()), "[DONE]"], time.monotonic() - t0))
                return
            events = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 1 and started is not None:
                        started.append(body.get("seed"))
        out.append((r.status_code, events, time.monotonic() - t0))
    except httpx.HTTPError as e:
        out.append((None, [repr(e)], time.monotonic() - t0))


@pytest.fixture
def fresh(tmp_path):
    s = start_stack(tmp_path, extra_env={"RNNSERVE_REQUEST_TIMEOUT_S": "60", "RNNSERVE_READY_PROBE_TIMEOUT_S": "1",
                                         **PACED})
    yield s
    stop_stack(s)


def test_killed_worker_ends_every_stream_with_an_error_then_recovers(fresh):
    results: list = []
    started: list = []
    threads = [threading.Thread(target=read_events, args=(fresh.url, {**LONG, "seed": i}, results, started))
               for i in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: len(started) == 3, "every stream's first event")  # paced: they run for over 40 s
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
        assert r.status_code == 200 and r.json()["translations"][0]["text"].startswith("A dog")
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 3
    for status, events, _ in results:
        # an error event ends a stream that had started; one that had not gets an error status
        assert status in (200, 502, 503) and events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err["code"] in (502, 503) and err["type"] in ("upstream_error", "unavailable_error"), err
    assert time.monotonic() - killed_at < 45  # no hung connection (the paced streams had 40 s left)
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
    started: list = []
    threads = [threading.Thread(target=read_events, args=(fresh.url, {**LONG, "seed": i}, results, started))
               for i in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: len(started) == 3, "every stream's first event")
    fresh.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 3
    for status, events, seconds in results:
        assert seconds < 40  # the graceful shutdown gives streams 10 s; the paced ones needed 40 more
        # each stream either ended properly or was told it failed; none hangs
        assert events and (events[-1] == "[DONE]" or status is None)
    assert fresh.proc.wait(timeout=60) == 0
    out = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
    assert str(fresh.run_dir) not in out


def test_a_client_that_never_reads_is_bounded_and_frees_its_slot(fresh):
    with httpx.Client(base_url=fresh.url, timeout=60) as c:
        with c.stream("POST", "/v1/generate", json={**LONG, "max_tokens": 600}) as r:
            assert r.status_code == 200
            # never read while the server writes: the paced generation goes on behind a full socket
            wait_for(lambda: metric(c, "rnnserve_requests_running", model="lm-shakespeare") == 1, "admission")
            time.sleep(2)
        # the connection closed unread: the slot is freed
        wait_for(lambda: metric(c, "rnnserve_requests_running", model="lm-shakespeare") == 0, "the slot to be freed")
        ok = c.post("/v1/generate", json={"model": "lm-shakespeare", "prompt": "b", "max_tokens": 4})
        assert ok.status_code == 200


def test_a_probe_queued_behind_answered_requests_keeps_the_model_ready(tmp_path):
    """Two rows, both held by paced streams: the readiness probe waits for a row longer than its timeout, but
    the model keeps answering, so it is busy, not stuck, and /readyz stays 200. (A model that answers
    nothing is reported: test_killed_worker_ends_every_stream_with_an_error_then_recovers.)"""
    s = start_stack(tmp_path, extra_env={"RNNSERVE_MAX_BATCH_SIZE": "2", "RNNSERVE_READY_PROBE_TIMEOUT_S": "1",
                                         **PACED})
    try:
        results: list = []
        started: list = []
        threads = [threading.Thread(target=read_events, args=(s.url, {**LONG, "seed": i}, results, started))
                   for i in range(2)]
        for t in threads:
            t.start()
        wait_for(lambda: len(started) == 2, "both streams' first events")  # paced: they run for over 40 s
        waiting = "lm-shakespeare: the readiness probe waits behind other requests"
        seen = len(s.log.read_text())  # what startup logged does not count
        wait_for(lambda: s.log.read_text()[seen:].count(waiting) >= 2, "a probe waiting past its timeout twice")
        with s.client() as c:
            r = c.get("/readyz")
        assert r.status_code == 200, r.text
        assert r.json()["models"]["lm-shakespeare"] == "ready"
        assert not results  # both streams still running: the probe did wait behind them
    finally:
        stop_stack(s)
    for t in threads:
        t.join(timeout=60)
