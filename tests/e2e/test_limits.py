"""Auth, overload, deadline and cancellation through a real stack started with tight limits."""
import json
import threading
import time

import httpx
import pytest

from rnnserve.service.stack import start_stack, stop_stack

pytestmark = pytest.mark.e2e

KEY = "k-" + "x" * 30
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = {"model": "lm-shakespeare", "prompt": "ROMEO:", "max_tokens": 2048, "temperature": 1.0}


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    s = start_stack(tmp_path_factory.mktemp("tight"), extra_env={
        "RNNSERVE_API_KEYS": json.dumps(["other-key", KEY]), "RNNSERVE_MAX_RUNNING_PER_MODEL": "2",
        "RNNSERVE_MAX_WAITING_PER_MODEL": "1", "RNNSERVE_REQUEST_TIMEOUT_S": "2"})
    yield s
    stop_stack(s)


def metric(client, name, **labels) -> float:
    text = client.get("/metrics", headers=AUTH).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{want}}} not exported")


def test_api_keys_guard_every_route_but_health_probes(tight):
    with tight.client() as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/generate")):
            r = c.request(method, path, json={"model": "lm-shakespeare"})
            assert r.status_code == 401
            assert r.json() == {"error": {"message": "missing or invalid API key; send `Authorization: Bearer <key>`",
                                          "type": "authentication_error", "param": None, "code": 401}}
            assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}x"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": KEY}).status_code == 401
        assert c.get("/v1/models", headers=AUTH).status_code == 200
        assert c.get("/v1/models", headers={"Authorization": "Bearer other-key"}).status_code == 200
    assert KEY not in tight.log.read_text()  # secrets never logged


def test_overload_answers_429_at_once_then_recovers(tight):
    results = {}

    def long_stream(name):
        with httpx.Client(base_url=tight.url, timeout=30) as c:
            with c.stream("POST", "/v1/generate", json={**LONG, "stream": True}, headers=AUTH) as r:
                results[name] = r.status_code
                for _ in r.iter_lines():
                    pass

    threads = [threading.Thread(target=long_stream, args=(f"s{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # both admitted and streaming
    waiter = threading.Thread(target=long_stream, args=("queued",))
    waiter.start()
    time.sleep(0.3)
    with tight.client() as c:
        t0 = time.monotonic()
        r = c.post("/v1/generate", json={**LONG, "max_tokens": 5}, headers=AUTH)
        assert time.monotonic() - t0 < 0.5
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"] == {"message": "model 'lm-shakespeare' is at capacity; retry in 1s",
                                     "type": "overloaded_error", "param": None, "code": "overloaded"}
        assert metric(c, "rnnserve_requests_waiting", model="lm-shakespeare") == 1
        for t in threads + [waiter]:
            t.join()
        assert results == {"s0": 200, "s1": 200, "queued": 200}
        ok = c.post("/v1/generate", json={**LONG, "max_tokens": 5}, headers=AUTH)
        assert ok.status_code == 200 and len(ok.json()["text"]) == 5
        assert metric(c, "rnnserve_requests_total", model="lm-shakespeare", route="generate",
                      outcome="overloaded") >= 1
        assert metric(c, "rnnserve_requests_running", model="lm-shakespeare") == 0


def test_deadline_ends_streams_with_an_error_event_and_plain_requests_with_504(tight):
    with tight.client() as c:
        t0 = time.monotonic()
        with c.stream("POST", "/v1/generate", json={**LONG, "stream": True}, headers=AUTH) as r:
            assert r.status_code == 200
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert 1.8 < time.monotonic() - t0 < 6
        assert json.loads(events[-2][6:]) == {"error": {"message": "the request did not finish before its deadline",
                                                        "type": "timeout_error", "param": None, "code": 504}}
        assert events[-1] == "data: [DONE]"
        r = c.post("/v1/generate", json=LONG, headers=AUTH)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
        assert metric(c, "rnnserve_requests_total", model="lm-shakespeare", route="generate", outcome="timeout") >= 2
    # the generation stopped upstream too: the handler freed the rows of the abandoned requests
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "left the batch" not in _model_log(tight):
        time.sleep(0.2)
    assert "left the batch (client gone)" in _model_log(tight)


def test_client_disconnect_frees_the_slot_and_is_counted(tight):
    with tight.client() as c:
        before = metric(c, "rnnserve_client_disconnects_total", model="lm-shakespeare")
        with c.stream("POST", "/v1/generate", json={**LONG, "stream": True}, headers=AUTH) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 4:
                    break  # leave mid-stream
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and metric(c, "rnnserve_requests_running", model="lm-shakespeare") != 0:
            time.sleep(0.1)
        assert metric(c, "rnnserve_requests_running", model="lm-shakespeare") == 0
        assert metric(c, "rnnserve_client_disconnects_total", model="lm-shakespeare") == before + 1
        # both slots are free again: two requests run at once without a 429
        rs = [c.post("/v1/generate", json={**LONG, "max_tokens": 3}, headers=AUTH) for _ in range(2)]
        assert [r.status_code for r in rs] == [200, 200]


def _model_log(stack) -> str:
    path = stack.run_dir / "logs" / "model_log.log"
    return path.read_text() if path.exists() else ""


def test_a_plain_request_whose_client_leaves_frees_its_slot(tight):
    with tight.client() as c:
        before = metric(c, "rnnserve_client_disconnects_total", model="lm-shakespeare")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{tight.url}/v1/generate", json={**LONG, "max_tokens": 2000}, headers=AUTH, timeout=1.0)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and metric(c, "rnnserve_requests_running", model="lm-shakespeare") != 0:
            time.sleep(0.1)
        assert metric(c, "rnnserve_requests_running", model="lm-shakespeare") == 0
        assert metric(c, "rnnserve_client_disconnects_total", model="lm-shakespeare") == before + 1
