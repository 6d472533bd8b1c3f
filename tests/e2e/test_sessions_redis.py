"""Sessions in one real Redis shared by two gateways over one TorchServe, each running two processes
(RNNSERVE_GATEWAY_WORKERS=2, RNNSERVE_SESSION_STORE): a session begun through one gateway continues exactly
through the other, one session serves one request at a time across them, and with Redis stopped session
requests get 503 while the others still work.

The two gateways are separate process trees on separate ports, so which process serves a request is certain.
Streams are paced (waits.PACED): a 2,048-token stream holds its session for over 40 s on any machine.
"""
import threading
import time

import httpx
import pytest

from rnnserve.service.stack import start_stack, stop_stack
from tests.e2e.gateways import second_gateway
from tests.e2e.waits import HANG_S, PACED, wait_for
from tests.redis_server import redis_server

pytestmark = pytest.mark.e2e

LM = "lm-shakespeare"
GREEDY = {"model": LM, "temperature": 0}


@pytest.fixture(scope="module")
def redis_srv(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def gateways(tmp_path_factory, redis_srv):
    """(url of the stack's gateway, url of a second gateway over the same TorchServe)."""
    tmp = tmp_path_factory.mktemp("redis-stack")
    shared = {"RNNSERVE_GATEWAY_WORKERS": "2", "RNNSERVE_SESSION_STORE": redis_srv.url,
              "RNNSERVE_SESSION_STORE_TIMEOUT_S": "1", **PACED}
    stack = start_stack(tmp, extra_env=shared)
    try:
        with second_gateway(stack, tmp, shared) as url:
            yield stack.url, url
    finally:
        stop_stack(stack)


def client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=HANG_S)


def generate(c: httpx.Client, **body) -> dict:
    r = c.post("/v1/generate", json={**GREEDY, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_session_begun_through_one_gateway_continues_exactly_through_the_other(gateways):
    a, b = gateways
    with client(a) as ca, client(b) as cb:
        whole = generate(ca, prompt="ROMEO:", max_tokens=60)["text"]
        first = generate(ca, prompt="ROMEO:", max_tokens=35, session="across")
        second = generate(cb, prompt="", max_tokens=25, session="across")
        assert first["text"] + second["text"] == whole
        info = cb.get("/v1/sessions/across").json()
        assert info == ca.get("/v1/sessions/across").json()
        assert info["model"] == LM and info["tokens"] == 6 + 60 - 1
        assert [s["id"] for s in ca.get("/v1/sessions").json()["data"]] == ["across"]
        r = cb.post("/v1/sessions/across/fork", json={"id": "across-fork"})
        assert r.status_code == 201 and r.json()["tokens"] == info["tokens"]
        assert ca.delete("/v1/sessions/across").status_code == 204
        r = cb.get("/v1/sessions/across")
        assert r.status_code == 404 and r.json()["error"]["message"] == "session 'across' does not exist (or expired)"
        assert cb.get("/v1/sessions/across-fork").status_code == 200
        assert cb.delete("/v1/sessions/across-fork").status_code == 204


def test_one_session_serves_one_request_at_a_time_across_gateways(gateways):
    a, b = gateways
    started, leave = threading.Event(), threading.Event()
    status: list[int] = []

    def hold() -> None:  # over 40 s of paced tokens: the session is in use until we leave
        with client(a) as c, c.stream("POST", "/v1/generate", json={**GREEDY, "prompt": "ROMEO:", "max_tokens": 2048,
                                                                     "stream": True, "session": "shared"}) as r:
            status.append(r.status_code)
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    started.set()
                if leave.is_set():
                    return

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    try:
        assert started.wait(HANG_S), "the holding stream did not start"
        with client(b) as cb:
            r = cb.post("/v1/generate", json={**GREEDY, "prompt": "", "max_tokens": 5, "session": "shared"})
            assert r.status_code == 409, r.text
            assert r.json() == {"error": {"message": "session 'shared' is in use by another request; retry when it "
                                          "ends", "type": "conflict_error", "param": "session", "code": 409}}
            r = cb.delete("/v1/sessions/shared")  # not yet ended: it has no state yet, so it is not listed
            assert r.status_code == 404
    finally:
        leave.set()
        t.join(HANG_S)
    assert status == [200]
    # the holder went away: its lease is released (a first request that never ended leaves no session)
    with client(b) as cb:
        wait_for(lambda: cb.post("/v1/generate", json={**GREEDY, "prompt": "A", "max_tokens": 3,
                                                       "session": "shared"}).status_code == 200,
                 "the session to be free again")
        assert cb.delete("/v1/sessions/shared").status_code == 204


def test_redis_stopped_gives_503_for_sessions_and_other_requests_work(gateways, redis_srv):
    a, b = gateways
    with client(a) as ca:
        generate(ca, prompt="KING:", max_tokens=5, session="before")
    redis_srv.stop()
    try:
        for url in (a, b):
            with client(url) as c:
                t0 = time.monotonic()
                r = c.post("/v1/generate", json={**GREEDY, "prompt": "", "max_tokens": 5, "session": "before"})
                assert time.monotonic() - t0 < HANG_S
                assert r.status_code == 503, r.text
                assert r.json()["error"]["type"] == "unavailable_error" and r.json()["error"]["code"] == 503
                assert r.json()["error"]["param"] == "session"
                r = c.get("/v1/sessions")
                assert r.status_code == 503 and r.json()["error"]["code"] == 503
                assert generate(c, prompt="ROMEO:", max_tokens=5)["text"]  # without a session: unaffected
    finally:
        redis_srv.start()  # an empty Redis (no persistence in the test): the gateways reconnect to it
    with client(b) as cb:
        assert generate(cb, prompt="KING:", max_tokens=5, session="after")["session"] == "after"
        assert [s["id"] for s in cb.get("/v1/sessions").json()["data"]] == ["after"]
