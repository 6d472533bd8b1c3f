"""The gateway's connection bounds on a real uvicorn server (a tiny app, no TorchServe): idle, slow and
never-reading clients are closed, a prompt one is served. The bounds are short here; the tests wait on
the connection's end with a bound only a hang reaches, so they do not depend on the machine's speed."""
from __future__ import annotations

import asyncio
import time

import pytest
import uvicorn

from rnnserve.service.gateway.connections import ConnectionBounds, protocol_factory
from rnnserve.service.stack import free_ports
from tests.rawsockets import connect, read_to_end
from tests.uvicorn_thread import HANG_S, serving

ended: list[str] = []  # what the app saw end: "stream" when a stream's body generator was closed


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/stream":  # writes until the server says the client is gone
        assert "rnnserve.abort" in scope["extensions"]
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while not gone.is_set():
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
            await asyncio.sleep(0)
        await watcher
        ended.append("stream")
        return
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            ended.append("body")
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    text = str(len(body)).encode()
    headers = [(b"content-length", str(len(text)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": text})


@pytest.fixture(scope="module")
def server():
    (port,) = free_ports(1)
    bounds = ConnectionBounds(header_timeout_s=0.5, body_timeout_s=0.5, write_timeout_s=0.5)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=protocol_factory(bounds), log_config=None,
                            timeout_keep_alive=30, lifespan="off")
    with serving(config):
        yield port


def test_a_prompt_client_is_served_and_kept_alive(server):
    with connect(f"http://127.0.0.1:{server}") as s:
        for _ in range(2):
            s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
            reply = s.recv(4096)
            assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"\r\n\r\n5")


def test_an_idle_connection_is_closed(server):
    with connect(f"http://127.0.0.1:{server}") as s:
        assert read_to_end(s) == b""


def test_headers_that_never_end_are_cut(server):
    with connect(f"http://127.0.0.1:{server}") as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\n")  # and nothing more
        assert read_to_end(s) == b""


def test_a_body_that_never_ends_is_cut(server):
    with connect(f"http://127.0.0.1:{server}") as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123456789")
        assert read_to_end(s) == b""
    deadline = time.monotonic() + HANG_S
    while "body" not in ended:  # the app waiting for the body was told the client is gone
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_client_that_stops_reading_is_dropped(server):
    with connect(f"http://127.0.0.1:{server}", rcvbuf=4096) as s:
        s.sendall(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
        deadline = time.monotonic() + HANG_S
        while "stream" not in ended:  # the app's write failed: the connection is gone
            assert time.monotonic() < deadline, "the stream still writes to a client that never reads"
            time.sleep(0.02)
        data = read_to_end(s)
        assert data.startswith(b"HTTP/1.1 200")
