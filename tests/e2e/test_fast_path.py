"""The streamed requests' fast path (service/gateway/fastpath.py) answers exactly as the FastAPI routes do.

Two gateways over one TorchServe: the stack's, with the fast path (the default), and a second one started with
RNNSERVE_GATEWAY_FAST_PATH=false. The same requests go to both, with the same X-Request-Id, and get the same
status, headers (but the date) and bytes. A seeded stream's text is certain, not how its tokens fall into frames
(a request arriving meanwhile, such as a readiness probe, joins a step and two tokens leave in one frame): streams
are compared with every event's text joined, and their last event (but its text) and [DONE] byte for byte. Each
gateway admits one stream and queues none, and streams are paced (waits.PACED), so a second stream gets 429 while
one holds the slot.
"""
import json
import re
import threading

import httpx
import pytest

from rnnserve.service.stack import start_stack, stop_stack
from tests.e2e.gateways import second_gateway
from tests.e2e.waits import HANG_S, PACED, metric, wait_for

pytestmark = pytest.mark.e2e

KEY = "fast-" + "k" * 27
AUTH = {"Authorization": f"Bearer {KEY}"}
LM = "lm-shakespeare"
RID = {"X-Request-Id": "same-request-7"}


@pytest.fixture(scope="module")
def gateways(tmp_path_factory):
    """(url of the gateway with the fast path, url of a gateway without it), over one TorchServe."""
    tmp = tmp_path_factory.mktemp("fast-path")
    shared = {"RNNSERVE_API_KEYS": json.dumps([KEY]), "RNNSERVE_MAX_RUNNING_PER_MODEL": "1",
              "RNNSERVE_MAX_WAITING_PER_MODEL": "0", "RNNSERVE_MAX_BODY_BYTES": "4096", **PACED}
    stack = start_stack(tmp, extra_env=shared)
    try:
        with second_gateway(stack, tmp, {**shared, "RNNSERVE_GATEWAY_FAST_PATH": "false"}) as url:
            yield stack.url, url
    finally:
        stop_stack(stack)


def answer(url: str, path: str, body: bytes, headers: dict) -> tuple[int, list, bytes]:
    """Status, headers but the date, and the body's bytes as they came (an SSE stream read to its end)."""
    with httpx.Client(base_url=url, timeout=HANG_S) as c:
        with c.stream("POST", path, content=body, headers=headers) as r:
            raw = b"".join(r.iter_raw())
            return r.status_code, [(k, v) for k, v in r.headers.raw if k.lower() != b"date"], raw


CREATED = re.compile(rb'"created":\d+')
TEXT = re.compile(rb'"text": ?"(?:[^"\\]|\\.)*"')


def both(gateways, path: str, body: dict | bytes, headers: dict | None = None,
         auth: bool = True) -> tuple[int, list, bytes]:
    """The two gateways' answers, asserted equal; the fast path's."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **RID, **(AUTH if auth else {}), **(headers or {})}
    fast, plain = (answer(url, path, content, headers) for url in gateways)
    assert fast[:2] == plain[:2]
    if fast[0] == 200:  # a completion's `created` is the second it was answered in: the two may straddle one
        fast, plain = ((*a[:2], CREATED.sub(b'"created":0', a[2])) for a in (fast, plain))
        assert joined(fast[2]) == joined(plain[2])
        # the last event and [DONE] byte for byte, but the last event's text: which tokens it carries is timing
        ends = [TEXT.sub(b'"text":""', b"\n\n".join(a[2].split(b"\n\n")[-3:])) for a in (fast, plain)]
        assert ends[0] == ends[1]
    else:
        assert fast[2] == plain[2]
    return fast


def joined(raw: bytes) -> tuple[dict, list]:
    """A stream's text (and logprobs) per choice, every event's joined, and its events without them, repeats
    of one shape in a row counted once: the same whichever frames the tokens fell into, the last one too."""
    texts: dict = {}
    shapes: list = []
    for event in events(raw):
        if isinstance(event, dict):
            for choice in event.get("choices", [event]):
                into = texts.setdefault(choice.get("index", 0), {"text": "", "logprobs": {}})
                if "text" in choice:
                    into["text"] += choice["text"]
                    choice["text"] = ""
                for key, values in (choice.get("logprobs") or {}).items():
                    into["logprobs"].setdefault(key, []).extend(values)
                    choice["logprobs"][key] = []
        if not shapes or shapes[-1] != event:
            shapes.append(event)
    return texts, shapes


def events(raw: bytes) -> list:
    parts = raw.decode().split("\n\n")
    assert parts[-1] == "" and all(p.startswith("data: ") for p in parts[:-1]), raw
    return [p[6:] if p == "data: [DONE]" else json.loads(p[6:]) for p in parts[:-1]]


def test_a_seeded_streamed_generation_is_the_same_bytes(gateways):
    body = {"model": LM, "prompt": "ROMEO:", "max_tokens": 24, "temperature": 0.8, "seed": 7, "stream": True}
    status, headers, raw = both(gateways, "/v1/generate", body)
    assert status == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in headers
    assert (b"x-request-id", b"same-request-7") in headers and (b"cache-control", b"no-cache") in headers
    got = events(raw)
    assert got[-1] == "[DONE]" and got[-2]["finish_reason"] == "length"
    assert len("".join(e["text"] for e in got[:-1])) == 24 and {e["id"] for e in got[:-1]} == {"same-request-7"}


def test_a_seeded_streamed_completion_is_the_same_bytes(gateways):
    body = {"model": LM, "prompt": "JULIET:", "max_tokens": 12, "temperature": 0.9, "seed": 3, "stream": True,
            "logprobs": 1, "echo": True, "stream_options": {"include_usage": True}}
    status, _, raw = both(gateways, "/v1/completions", body)
    assert status == 200
    got = events(raw)
    assert got[-1] == "[DONE]" and got[-2]["usage"]["completion_tokens"] == 12
    assert got[0]["choices"][0]["text"].startswith("JULIET:") and got[0]["id"] == "cmpl-same-request-7"




def test_a_generated_request_id_is_echoed_and_names_the_stream(gateways):
    fast, _ = gateways
    with httpx.Client(base_url=fast, timeout=HANG_S) as c:
        with c.stream("POST", "/v1/generate", headers={**AUTH, "X-Request-Id": "bad id!"},
                      json={"model": LM, "prompt": "A", "max_tokens": 2, "stream": True}) as r:
            rid = r.headers["x-request-id"]
            got = events(b"".join(r.iter_raw()))
    assert re.fullmatch(r"[0-9a-f]{32}", rid) and got[0]["id"] == rid


@pytest.mark.parametrize("headers, auth", [({}, False), ({"Authorization": f"Bearer {KEY}x"}, False),
                                           ({"Authorization": KEY}, False)])
def test_a_missing_or_wrong_key_gets_the_same_401(gateways, headers, auth):
    status, got, raw = both(gateways, "/v1/generate", {"model": LM, "stream": True}, headers, auth)
    assert status == 401 and (b"www-authenticate", b"Bearer") in got
    assert json.loads(raw)["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("path, body, status", [
    ("/v1/generate", {"model": LM, "max_tokens": 0, "stream": True}, 400),
    ("/v1/generate", {"model": "no-such-model", "stream": True}, 404),
    ("/v1/completions", {"model": "no-such-model", "prompt": "a", "stream": True}, 404),
    ("/v1/completions", {"model": LM, "prompt": "a", "stream": True, "n": 2, "best_of": 1}, 400),
    ("/v1/generate", {"model": LM, "stream": True, "unknown": 1}, 400),
    ("/v1/generate", {"model": LM, "stream": "yes"}, 400),
    ("/v1/generate", b'{"model": "lm-shakespeare", "stream": true', 400),
    ("/v1/generate", b"[" * 5000, 413),  # past the body limit (4 KiB)
    ("/v1/completions", {"model": LM, "prompt": "x" * 5000, "stream": True}, 413),
])
def test_an_invalid_streamed_request_gets_the_same_error(gateways, path, body, status):
    got_status, _, raw = both(gateways, path, body)
    assert got_status == status, raw
    error = json.loads(raw)["error"]
    assert error["code"] == status and error["message"]


def test_a_body_that_is_not_json_gets_the_same_error(gateways):
    body = json.dumps({"model": LM, "stream": True}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        status, _, _ = both(gateways, "/v1/generate", body, {"Content-Type": content_type})
        assert status == 400


def test_a_stream_over_capacity_gets_the_same_429(gateways):
    """Each gateway admits one stream and queues none: a paced long stream holds the slot meanwhile."""
    leave = threading.Event()
    statuses: dict[str, int] = {}

    def hold(url: str) -> None:
        with httpx.Client(base_url=url, timeout=HANG_S) as c:
            with c.stream("POST", "/v1/generate", headers=AUTH,
                          json={"model": LM, "prompt": "A", "max_tokens": 2048, "stream": True}) as r:
                statuses[url] = r.status_code
                for _ in r.iter_lines():
                    if leave.is_set():
                        break

    holders = [threading.Thread(target=hold, args=(url,)) for url in gateways]
    try:
        for t in holders:
            t.start()
        for url in gateways:
            with httpx.Client(base_url=url, timeout=HANG_S) as c:
                wait_for(lambda: metric(c, "rnnserve_requests_running", AUTH, model=LM) == 1, "the slot held")
        status, headers, raw = both(gateways, "/v1/generate", {"model": LM, "prompt": "B", "stream": True})
        assert status == 429 and (b"retry-after", b"1") in headers
        assert json.loads(raw)["error"]["type"] == "overloaded_error"
    finally:
        leave.set()
        for t in holders:
            t.join(HANG_S)
    assert statuses == {url: 200 for url in gateways}
    for url in gateways:  # the streams that left freed their slots at once
        with httpx.Client(base_url=url, timeout=HANG_S) as c:
            wait_for(lambda: metric(c, "rnnserve_requests_running", AUTH, model=LM) == 0, "the slot freed")
            assert metric(c, "rnnserve_requests_total", AUTH, model=LM, route="generate", outcome="overloaded") == 1
