"""A client that stops reading its stream, through the real stack: its writes block, and at the request's
deadline the stream is dropped, its admission slots freed and its connection closed.

The stack's deadline is 30 s and its write bound longer, so that the deadline is what ends the stream.
Its send buffer per connection is 64 KiB: the stream's events (megabytes) are many times what the
buffers then hold, so its writes block however fast the machine, and it cannot end on its own."""
from __future__ import annotations

import json

import httpx
import pytest

from rnnserve.service.stack import start_stack, stop_stack
from tests.e2e.waits import metric, wait_for
from tests.rawsockets import connect, read_to_end

pytestmark = pytest.mark.e2e

LM = "lm-shakespeare"


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    s = start_stack(tmp_path_factory.mktemp("slow"), extra_env={
        "RNNSERVE_MODELS": json.dumps([LM]), "RNNSERVE_REQUEST_TIMEOUT_S": "30",
        "RNNSERVE_WRITE_TIMEOUT_S": "600", "RNNSERVE_SEND_BUFFER_BYTES": "65536"})
    yield s
    stop_stack(s)


def timeouts(c: httpx.Client) -> float:
    try:
        return metric(c, "rnnserve_requests_total", model=LM, route="completions", outcome="timeout")
    except AssertionError:  # not exported before the first one
        return 0.0


def test_a_client_that_stops_reading_gets_its_slots_freed_at_the_deadline(slow):
    """Eight completions of 2,048 tokens with 5 alternatives per token (about 3 MB of events), which a
    client with a tiny receive buffer never reads."""
    body = json.dumps({"model": LM, "prompt": "ROMEO:", "max_tokens": 2048, "n": 8, "logprobs": 5,
                       "stream": True}).encode()
    with slow.client() as c:
        before = timeouts(c)
        with connect(slow.url, rcvbuf=4096) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            assert s.recv(12) == b"HTTP/1.1 200"  # the stream started; from here on nobody reads
            wait_for(lambda: metric(c, "rnnserve_requests_running", model=LM) == 0,
                     "the blocked stream's slots to be freed")
            rest = read_to_end(s)
        # dropped in a write, not ended by the deadline between frames (that ends with an error event
        # and [DONE]): the client got a cut stream, and the server closed the connection
        assert b"data: [DONE]" not in rest and b"timeout_error" not in rest
        assert timeouts(c) == before + 8
        ok = c.post("/v1/generate", json={"model": LM, "prompt": "A", "max_tokens": 3})
        assert ok.status_code == 200 and len(ok.json()["text"]) == 3
