"""A response's head goes out with its first body bytes (connections.py), on a real uvicorn server with the
gateway's protocol: what the protocol writes to the connection's transport is recorded under it."""
from __future__ import annotations

import asyncio
import time

import pytest
import uvicorn

from rnnserve.service.gateway.connections import BoundedHttpToolsProtocol, ConnectionBounds, HeadHoldingTransport
from rnnserve.service.gateway.generation import DONE, SSE_HEADERS, serve_events
from rnnserve.service.stack import free_ports
from tests.rawsockets import connect, read_to_end
from tests.uvicorn_thread import HANG_S, serving

EVENTS = [b"data: {\"text\": \"a\"}\n\n", b"data: {\"text\": \"b\"}\n\n", b"data: {\"text\": \"c\"}\n\n" + DONE]
writes: list[bytes] = []  # what the protocol wrote to the connection's transport, in order


class Recorder:
    """Under the protocol's transport: records every write, then passes it on."""

    def __init__(self, transport) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class RecordedProtocol(BoundedHttpToolsProtocol):
    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(Recorder(transport))


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/events":  # the gateway's SSE writer, each event ready when asked for
        async def events():
            for chunk in EVENTS:
                yield chunk
                await asyncio.sleep(0.001)
        return await serve_events(scope, receive, send, list(SSE_HEADERS), events(), time.monotonic() + HANG_S)
    if scope["path"] == "/late":  # a head whose body is not ready in the same turn of the loop
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
        while not writes:
            await asyncio.sleep(0.001)
        await send({"type": "http.response.body", "body": b"late"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(scope="module")
def server():
    (port,) = free_ports(1)
    bounds = ConnectionBounds(header_timeout_s=HANG_S, body_timeout_s=HANG_S, write_timeout_s=HANG_S)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off",
                            http=lambda *a, **k: RecordedProtocol(*a, bounds=bounds, **k))
    with serving(config):
        yield port


def request(port: int, path: str) -> bytes:
    writes.clear()
    with connect(f"http://127.0.0.1:{port}") as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        return read_to_end(s)


def test_a_json_answer_is_one_write(server):
    reply = request(server, "/json")
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b"\r\n\r\nok")
    assert writes == [reply]


def test_a_stream_s_head_goes_with_its_first_event(server):
    reply = request(server, "/events")
    assert len(writes) == 3 and b"".join(writes) == reply
    head, first = writes[0].split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-type: text/event-stream" in head
    assert first == b"%x\r\n" % len(EVENTS[0]) + EVENTS[0] + b"\r\n"
    assert writes[2].endswith(DONE + b"\r\n0\r\n\r\n")


def test_a_head_without_a_ready_body_is_not_held_past_the_loop_s_turn(server):
    # the app sends its body only once the head was written: held until it, the request would hang
    reply = request(server, "/late")
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b"\r\n\r\nlate")
    assert len(writes) == 2 and writes[0].endswith(b"\r\n\r\n") and writes[1] == b"late"


class FakeTransport:
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


def test_held_bytes_keep_their_order_and_are_flushed_on_close_not_on_abort():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        t = FakeTransport()
        held = HeadHoldingTransport(t, loop)  # type: ignore[arg-type]
        held.write(b"a")  # not armed: at once
        held.arm()
        held.write(b"head")
        assert t.out == [b"a"]
        held.write(b"body")
        assert t.out == [b"a", b"headbody"]
        held.arm()
        held.write(b"head2")
        await asyncio.sleep(0)  # the end of the turn
        assert t.out[-1] == b"head2"
        held.arm()
        held.write(b"head3")
        held.writelines([b"x", b"y"])
        assert t.out[-1] == b"head3xy"
        held.arm()
        held.write(b"head4")
        held.close()
        assert t.out[-1] == b"head4" and t.closed
        t2 = FakeTransport()
        held2 = HeadHoldingTransport(t2, loop)  # type: ignore[arg-type]
        held2.arm()
        held2.write(b"head")
        held2.abort()
        await asyncio.sleep(0)
        assert t2.out == [] and t2.aborted

    asyncio.run(main())
