"""Auth, overload, deadline and cancellation through a real stack started with tight limits.

The stack's streams are paced (waits.PACED): a long generation cannot finish before the deadline on
any machine, and every test waits on states (metrics, events), not on durations.
"""
import json
import threading
import time

import httpx
import pytest

from rnnserve.service.stack import start_stack, stop_stack
from tests.e2e.waits import PACED, metric, wait_for
from tests.rawsockets import connect, read_to_end

pytestmark = pytest.mark.e2e

KEY = "k-" + "x" * 30
AUTH = {"Authorization": f"Bearer {KEY}"}
LM = "lm-shakespeare"
LONG = {"model": LM, "prompt": "ROMEO:", "max_tokens": 2048, "temperature": 1.0}  # paced: over 40 s
DEADLINE_S = 8


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    s = start_stack(tmp_path_factory.mktemp("tight"), extra_env={
        "RNNSERVE_API_KEYS": json.dumps(["other-key", KEY]), "RNNSERVE_MAX_RUNNING_PER_MODEL": "2",
        "RNNSERVE_MAX_WAITING_PER_MODEL": "1", "RNNSERVE_REQUEST_TIMEOUT_S": str(DEADLINE_S),
        # two keys: each may hold 2 sessions of a model; connections must send headers and bodies within
        # 3 s; the write bound is long, so that a stream blocked in a write ends at its deadline
        "RNNSERVE_MAX_SESSIONS_PER_MODEL": "4", "RNNSERVE_HEADER_TIMEOUT_S": "3", "RNNSERVE_BODY_TIMEOUT_S": "3",
        "RNNSERVE_WRITE_TIMEOUT_S": "600", **PACED})
    yield s
    stop_stack(s)


def gauge(c: httpx.Client, name: str) -> float:
    return metric(c, name, AUTH, model=LM)


def test_api_keys_guard_every_route_but_health_probes(tight):
    with tight.client() as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/generate"), ("GET", "/docs"),
                             ("GET", "/redoc"), ("GET", "/openapi.json")):
            r = c.request(method, path, json={"model": LM})
            assert r.status_code == 401
            assert r.json() == {"error": {"message": "missing or invalid API key; send `Authorization: Bearer <key>`",
                                          "type": "authentication_error", "param": None, "code": 401}}
            assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}x"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": KEY}).status_code == 401
        assert c.get("/v1/models", headers=AUTH).status_code == 200
        assert c.get("/v1/models", headers={"Authorization": "Bearer other-key"}).status_code == 200
        for spelling in (f"bearer {KEY}", f"Bearer  {KEY}", f"BEARER {KEY}"):
            assert c.get("/v1/models", headers={"Authorization": spelling}).status_code == 200
        # the documentation needs the key too, and its scripts come from the gateway, not a CDN
        assert c.get("/openapi.json", headers=AUTH).json()["info"]["title"] == "rnnserve"
        page = c.get("/docs", headers=AUTH).text
        assert '<script src="/docs/assets/swagger-ui-bundle.js">' in page
        assert c.get("/docs/assets/swagger-ui-bundle.js").status_code == 200  # a library's file: no key
        assert "/docs/assets/redoc.standalone.js" in c.get("/redoc", headers=AUTH).text
    assert KEY not in tight.log.read_text()  # secrets never logged


def test_overload_answers_429_at_once_then_recovers(tight):
    statuses: dict[str, int] = {}
    leave = threading.Event()

    def long_stream(name: str) -> None:  # reads until told to leave, then closes the connection
        with httpx.Client(base_url=tight.url, timeout=60) as c:
            with c.stream("POST", "/v1/generate", json={**LONG, "stream": True}, headers=AUTH) as r:
                statuses[name] = r.status_code
                for _ in r.iter_lines():
                    if leave.is_set():
                        break

    threads = [threading.Thread(target=long_stream, args=(f"s{i}",)) for i in range(2)]
    waiter = threading.Thread(target=long_stream, args=("queued",))
    with tight.client() as c:
        for t in threads:
            t.start()
        wait_for(lambda: gauge(c, "rnnserve_requests_running") == 2, "both streams admitted")
        waiter.start()
        wait_for(lambda: gauge(c, "rnnserve_requests_waiting") == 1, "the third stream queued")
        r = c.post("/v1/generate", json={**LONG, "max_tokens": 5}, headers=AUTH)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"] == {"message": "model 'lm-shakespeare' is at capacity; retry in 1s",
                                     "type": "overloaded_error", "param": None, "code": 429}
        # refused at once: the streams it would have waited for are still running, the queue unchanged
        assert gauge(c, "rnnserve_requests_running") == 2 and gauge(c, "rnnserve_requests_waiting") == 1
        assert "queued" not in statuses
        leave.set()  # the two streams leave; the queued one gets a slot, answers 200 and leaves too
        for t in threads + [waiter]:
            t.join(timeout=60)
        assert statuses == {"s0": 200, "s1": 200, "queued": 200}
        wait_for(lambda: gauge(c, "rnnserve_requests_running") == 0, "every slot free")
        ok = c.post("/v1/generate", json={**LONG, "max_tokens": 5}, headers=AUTH)
        assert ok.status_code == 200 and len(ok.json()["text"]) == 5
        assert metric(c, "rnnserve_requests_total", AUTH, model=LM, route="generate", outcome="overloaded") >= 1


def test_deadline_ends_streams_with_an_error_event_and_plain_requests_with_504(tight):
    plain: dict = {}
    blocking = threading.Thread(target=lambda: plain.update(
        r=httpx.post(f"{tight.url}/v1/generate", json=LONG, headers=AUTH, timeout=60)))
    with tight.client() as c:
        blocking.start()
        t0 = time.monotonic()
        with c.stream("POST", "/v1/generate", json={**LONG, "stream": True}, headers=AUTH) as r:
            assert r.status_code == 200
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        # the deadline ended it (the paced stream needs over 40 s), and not before the deadline
        assert time.monotonic() - t0 > DEADLINE_S - 0.2
        assert len(events) >= 3  # some text came before the error event and [DONE]
        assert json.loads(events[-2][6:]) == {"error": {"message": "the request did not finish before its deadline",
                                                        "type": "timeout_error", "param": None, "code": 504}}
        assert events[-1] == "data: [DONE]"
        blocking.join(timeout=60)
        assert plain["r"].status_code == 504 and plain["r"].json()["error"]["type"] == "timeout_error"
        assert metric(c, "rnnserve_requests_total", AUTH, model=LM, route="generate", outcome="timeout") >= 2
    # the generation stopped upstream too: the handler freed the rows of the abandoned requests
    wait_for(lambda: "left the batch (client gone)" in _model_log(tight), "the handler to free the rows")


def test_client_disconnect_frees_the_slot_and_is_counted(tight):
    with tight.client() as c:
        before = metric(c, "rnnserve_client_disconnects_total", AUTH, model=LM)
        with c.stream("POST", "/v1/generate", json={**LONG, "stream": True}, headers=AUTH) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 4:
                    break  # leave mid-stream
        wait_for(lambda: gauge(c, "rnnserve_requests_running") == 0, "the slot to be freed")
        assert metric(c, "rnnserve_client_disconnects_total", AUTH, model=LM) == before + 1
        # both slots are free again: two requests run at once without a 429
        rs = [c.post("/v1/generate", json={**LONG, "max_tokens": 3}, headers=AUTH) for _ in range(2)]
        assert [r.status_code for r in rs] == [200, 200]


def _model_log(stack) -> str:
    path = stack.run_dir / "logs" / "model_log.log"
    return path.read_text() if path.exists() else ""


def test_a_plain_request_whose_client_leaves_frees_its_slot(tight):
    with tight.client() as c:
        before = metric(c, "rnnserve_client_disconnects_total", AUTH, model=LM)
        # paced, 2,000 tokens need over 40 s and the deadline answers after 8: a 1 s read timeout always trips
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{tight.url}/v1/generate", json={**LONG, "max_tokens": 2000}, headers=AUTH, timeout=1.0)
        wait_for(lambda: gauge(c, "rnnserve_requests_running") == 0, "the slot to be freed")
        assert metric(c, "rnnserve_client_disconnects_total", AUTH, model=LM) == before + 1


def test_sessions_are_bounded_per_key_and_private_to_their_key(tight):
    other = {"Authorization": "Bearer other-key"}
    with tight.client(headers=AUTH) as c:
        for sid in ("s1", "s2", "s3"):
            r = c.post("/v1/generate", json={"model": LM, "prompt": "A", "max_tokens": 2, "session": sid})
            assert r.status_code == 200, r.text
        # the least recently used went first
        assert sorted(s["id"] for s in c.get("/v1/sessions").json()["data"]) == ["s2", "s3"]
        assert c.get("/v1/sessions/s1").status_code == 404
        assert gauge(c, "rnnserve_sessions") == 2
        assert metric(c, "rnnserve_session_evictions_total", AUTH, model=LM, reason="capacity") == 1
        # another key sees none of them, and cannot continue or delete them
        assert c.get("/v1/sessions", headers=other).json()["data"] == []
        assert c.get("/v1/sessions/s2", headers=other).status_code == 404
        assert c.delete("/v1/sessions/s2", headers=other).status_code == 404
        assert c.get("/v1/sessions/s2").json()["tokens"] == 2
        for sid in ("s2", "s3"):
            assert c.delete(f"/v1/sessions/{sid}").status_code == 204


def test_a_session_serves_one_request_at_a_time(tight):
    with httpx.Client(base_url=tight.url, timeout=60, headers=AUTH) as c:
        with c.stream("POST", "/v1/generate", json={**LONG, "stream": True, "session": "busy"}) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")  # the first stream is running
            r = c.post("/v1/generate", json={"model": LM, "prompt": "A", "max_tokens": 2, "session": "busy"})
            assert r.status_code == 409
            assert r.json() == {"error": {"message": "session 'busy' is in use by another request; retry when it "
                                                     "ends", "type": "conflict_error", "param": "session",
                                          "code": 409}}
        # the stream was cancelled: a new session whose first request never ended does not exist
        wait_for(lambda: gauge(c, "rnnserve_requests_running") == 0, "the cancelled stream to leave")
        assert c.get("/v1/sessions/busy").status_code == 404
        r = c.post("/v1/generate", json={"model": LM, "prompt": "A", "max_tokens": 2, "session": "busy"})
        assert r.status_code == 200
        c.delete("/v1/sessions/busy")


def test_idle_and_slow_connections_are_closed(tight):
    with connect(tight.url) as idle, connect(tight.url) as headers, connect(tight.url) as body:
        headers.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: t\r\n")  # and no end of headers
        body.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"mo")
        for s in (idle, headers, body):
            assert read_to_end(s) == b""


def test_a_chunked_body_over_the_limit_gets_413(tight):
    def chunks():
        for _ in range(300):
            yield b" " * 1024  # 300 KiB, no Content-Length

    with tight.client() as c:
        r = c.post("/v1/generate", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 413
        assert r.json()["error"]["message"] == "request body is larger than 262144 bytes"


def test_one_key_cannot_push_out_anothers_sessions(tight):
    other = {"Authorization": "Bearer other-key"}
    with tight.client() as c:
        r = c.post("/v1/generate", json={"model": LM, "prompt": "A", "max_tokens": 2, "session": "theirs"},
                   headers=other)
        assert r.status_code == 200
        r = c.post("/v1/generate", json={"model": LM, "prompt": "B", "max_tokens": 2, "session": "mine"}, headers=AUTH)
        assert r.status_code == 200
        for i in range(20):  # forks count against the key's quota (2): its own oldest go
            assert c.post("/v1/sessions/mine/fork", json={"id": f"f{i}"}, headers=AUTH).status_code == 201
        assert sorted(s["id"] for s in c.get("/v1/sessions", headers=AUTH).json()["data"]) == ["f19", "mine"]
        assert c.get("/v1/sessions/theirs", headers=other).json()["tokens"] == 2
        # the owner is the key itself, however the header spells it
        assert len(c.get("/v1/sessions", headers={"Authorization": f"bearer  {KEY}"}).json()["data"]) == 2
        for sid in ("f19", "mine"):
            assert c.delete(f"/v1/sessions/{sid}", headers=AUTH).status_code == 204
        assert c.delete("/v1/sessions/theirs", headers=other).status_code == 204


def test_a_busy_session_cannot_be_deleted_and_keeps_its_turn(tight):
    with httpx.Client(base_url=tight.url, timeout=60, headers=AUTH) as c:
        r = c.post("/v1/generate", json={"model": LM, "prompt": "A", "max_tokens": 2, "session": "dr"})
        held = c.get("/v1/sessions/dr").json()["tokens"]
        with c.stream("POST", "/v1/generate", json={**LONG, "stream": True, "session": "dr"}) as stream:
            lines = stream.iter_lines()  # held: dropping the iterator would close the stream
            first = next(lines)
            assert stream.status_code == 200 and first.startswith("data: {\"id\"")  # R1 holds the session
            r = c.delete("/v1/sessions/dr")
            assert r.status_code == 409
            assert r.json() == {"error": {"message": "session 'dr' is in use by another request; retry when it "
                                                     "ends", "type": "conflict_error", "param": "session",
                                          "code": 409}}
            assert c.post("/v1/generate", json={"model": LM, "prompt": "A", "max_tokens": 2,
                                                "session": "dr"}).status_code == 409
        # R1's client left: its lease ends without a turn, the session keeps the one it had
        wait_for(lambda: gauge(c, "rnnserve_requests_running") == 0, "the cancelled stream to leave")
        assert c.get("/v1/sessions/dr").json()["tokens"] == held
        assert c.delete("/v1/sessions/dr").status_code == 204


def test_a_state_is_bound_to_its_key_and_decoded_strictly(tight):
    other = {"Authorization": "Bearer other-key"}
    body = {"model": LM, "prompt": "ROMEO:", "max_tokens": 2, "temperature": 0}
    with tight.client() as c:
        state = c.post("/v1/generate", json={**body, "return_state": True}, headers=AUTH).json()["state"]
        r = c.post("/v1/generate", json={**body, "state": state}, headers=other)
        assert r.status_code == 400 and r.json()["error"]["message"] == (
            "state's signature does not match: it was altered, signed with another key, or issued to another API key")
        same_key = {"Authorization": f"bearer   {KEY}"}
        assert c.post("/v1/generate", json={**body, "state": state}, headers=same_key).status_code == 200
        prefix, model, blob, mac = state.split(".")
        junk = ".".join([prefix, model, blob[:10] + "*" + blob[10:], mac])
        r = c.post("/v1/generate", json={**body, "state": junk}, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["message"] == "state is not a state this server issued"


def test_a_key_whose_sessions_are_all_in_use_gets_429(tight):
    with httpx.Client(base_url=tight.url, timeout=60, headers=AUTH) as c:
        with c.stream("POST", "/v1/generate", json={**LONG, "stream": True, "session": "q1"}) as one, \
                c.stream("POST", "/v1/generate", json={**LONG, "stream": True, "session": "q2"}) as two:
            held = [one.iter_lines(), two.iter_lines()]  # held: dropping an iterator would close its stream
            assert all(next(lines).startswith('data: {"id"') for lines in held)
            r = c.post("/v1/generate", json={"model": LM, "prompt": "A", "max_tokens": 2, "session": "q3"})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json() == {"error": {"message": "this API key's 2 sessions of model 'lm-shakespeare' are all in "
                                                     "use; retry when one ends, or delete one",
                                          "type": "quota_error", "param": "session", "code": 429}}
        wait_for(lambda: gauge(c, "rnnserve_requests_running") == 0, "the cancelled streams to leave")
        r = c.post("/v1/generate", json={"model": LM, "prompt": "A", "max_tokens": 2, "session": "q3"})
        assert r.status_code == 200
        assert c.delete("/v1/sessions/q3").status_code == 204
