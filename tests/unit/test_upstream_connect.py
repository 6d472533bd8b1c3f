"""The gateway's client of TorchServe (service/gateway/upstream.py over torchserve_client.py) against a
stand-in inference address on loopback: frames, keep-alive, and every error the routes turn into a status."""
from __future__ import annotations

import asyncio
import json
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from rnnserve.service.gateway import torchserve_client as tsc
from rnnserve.service.gateway.upstream import Upstream, UpstreamError
from rnnserve.service.settings import Settings

HEAD_200 = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n"
            b"connection: keep-alive\r\n\r\n")
FRAME_A = {"text": "To be", "batch": 1}
FRAME_B = {"text": ", or not", "batch": 1}
LAST = {"text": "", "finish_reason": "length", "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
BODY = {"prompt": "Hamlet: ", "max_tokens": 2}
# every wait below only catches a hang
HANG = 30


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def line(frame: dict) -> bytes:
    return json.dumps(frame).encode() + b"\n"


END = b"0\r\n\r\n"


@dataclass
class Request:
    head: list[str]
    body: bytes

    def header(self, name: str) -> str | None:
        for h in self.head[1:]:
            k, _, v = h.partition(":")
            if k.strip().lower() == name.lower():
                return v.strip()
        return None


@dataclass
class StandIn:
    """What the stand-in saw: the requests per connection, and which connections the client closed."""
    port: int = 0
    connections: list[list[Request]] = field(default_factory=list)
    closed_by_client: list[int] = field(default_factory=list)  # connection indexes, in the order seen
    closed: asyncio.Event = field(default_factory=asyncio.Event)


@asynccontextmanager
async def stand_in(answer, unix_path: str | None = None):
    """A TorchServe inference address on a free loopback port, or on the Unix socket `unix_path`.
    `answer(request, writer, n)` writes the answer to the n-th request (0-based, over all connections); the
    connection stays open for the next request unless the answer closes it."""
    seen = StandIn()
    count = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        index = len(seen.connections)
        seen.connections.append([])
        try:
            while True:
                try:
                    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")[:-2]
                except asyncio.IncompleteReadError:
                    seen.closed_by_client.append(index)
                    seen.closed.set()
                    return
                req = Request(head, b"")
                req.body = await reader.readexactly(int(req.header("content-length") or 0))
                seen.connections[index].append(req)
                n, count = count, count + 1
                if await answer(req, writer, n) is False:
                    writer.close()
                    return
                await writer.drain()
        except ConnectionError:
            seen.closed_by_client.append(index)
            seen.closed.set()

    if unix_path:
        server = await asyncio.start_unix_server(handle, unix_path)
    else:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        seen.port = server.sockets[0].getsockname()[1]
    try:
        yield seen
    finally:
        server.close()


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    """Each test on asyncio's loop and on uvloop, the gateway's."""
    if request.param == "uvloop":
        return pytest.importorskip("uvloop").run
    return asyncio.run


def upstream(port: int, **settings) -> Upstream:
    return Upstream(Settings(ts_url=f"http://127.0.0.1:{port}", ts_token_auth=False, **settings))


@asynccontextmanager
async def serving(answer, **settings):
    """A stand-in answering with `answer`, and an Upstream of it, closed when done."""
    async with stand_in(answer) as s:
        up = upstream(s.port, **settings)
        try:
            yield s, up
        finally:
            await up.close()


async def collect(up: Upstream, model: str = "lm", body: dict = BODY) -> list[dict]:
    async with asyncio.timeout(HANG):
        return [f async for f in up.frames(model, body)]


async def streamed(req, writer, n) -> None:
    """A well-formed stream: a frame per chunk, the last one, the terminating chunk."""
    writer.write(HEAD_200 + chunk(line(FRAME_A)) + chunk(line(FRAME_B)) + chunk(line(LAST)) + END)


def run_failing(run, answer, **settings) -> UpstreamError:
    async def main() -> UpstreamError:
        async with serving(answer, **settings) as (_, up):
            with pytest.raises(UpstreamError) as e:
                await collect(up)
            return e.value
    return run(main())


# frames

def test_frames_arrive_in_order_and_the_request_carries_the_body_and_headers(run, tmp_path):
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": "k3yK3yk3", "expiration time": "2999-01-01T00:00:00Z"},
                                    "API": {"key": "ap1ap1ap"}}))

    async def main():
        async with stand_in(streamed) as s:
            up = Upstream(Settings(ts_url=f"http://127.0.0.1:{s.port}", ts_token_auth=True, ts_key_file=key_file))
            try:
                frames = await collect(up, "lm-shakespeare")
            finally:
                await up.close()
            assert frames == [FRAME_A, FRAME_B, LAST]
            (req,), = s.connections
            assert req.head[0] == "POST /predictions/lm-shakespeare HTTP/1.1"
            assert req.header("authorization") == "Bearer k3yK3yk3"
            assert req.header("content-type") == "application/json"
            # only what TorchServe reads: its frontend sends each header to the worker again on every step
            assert sorted(h.partition(":")[0].lower() for h in req.head[1:]) == [
                "authorization", "content-length", "content-type", "host"]
            assert json.loads(req.body) == BODY
            assert "lm-shakespeare" in up.last_frame
    run(main())


def test_a_frame_split_over_chunks_and_reads_is_put_back_together(run):
    text = line(FRAME_A)

    async def answer(req, writer, n):
        writer.write(HEAD_200 + chunk(text[:3]))
        await writer.drain()
        await asyncio.sleep(0.05)  # a separate read for each piece
        writer.write(chunk(text[3:9]))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(chunk(text[9:]) + chunk(line(LAST)) + END)

    async def main():
        async with serving(answer) as (_, up):
            assert await collect(up) == [FRAME_A, LAST]
    run(main())


def test_several_frames_in_one_chunk_and_a_last_frame_without_newline(run):
    async def answer(req, writer, n):
        writer.write(HEAD_200 + chunk(line(FRAME_A) + line(FRAME_B) + b"\n" + json.dumps(LAST).encode()) + END)

    async def main():
        async with serving(answer) as (_, up):
            assert await collect(up) == [FRAME_A, FRAME_B, LAST]
    run(main())


def test_finished_streams_reuse_their_connection(run):
    async def main():
        async with serving(streamed) as (s, up):
            for i in range(3):
                assert await collect(up, body={**BODY, "seed": i}) == [FRAME_A, FRAME_B, LAST]
            # two at once need two connections; both go back to the pool
            await asyncio.gather(collect(up), collect(up))
            await collect(up)
        assert sorted(len(c) for c in s.connections) in ([1, 5], [2, 4])  # 6 requests over 2 connections
        assert [json.loads(r.body).get("seed") for r in s.connections[0][:3]] == [0, 1, 2]
    run(main())


def test_a_unix_socket_address_streams_and_reuses_its_connection(run, tmp_path):
    """ts_url=unix:/path (settings.ts_inference_socket): the same requests and frames over a Unix socket."""
    path = str(tmp_path / "ts.sock")

    async def main():
        async with stand_in(streamed, unix_path=path) as s:
            up = Upstream(Settings(ts_url=f"unix:{path}", ts_token_auth=False))
            try:
                for i in range(2):
                    assert await collect(up, "lm-shakespeare", {**BODY, "seed": i}) == [FRAME_A, FRAME_B, LAST]
            finally:
                await up.close()
        (first, second), = s.connections  # one connection, kept alive
        assert first.head[0] == "POST /predictions/lm-shakespeare HTTP/1.1"
        assert first.header("host") == "localhost"
        assert [json.loads(r.body)["seed"] for r in (first, second)] == [0, 1]
    run(main())


def test_a_connection_idle_too_long_is_closed_not_reused(run, monkeypatch):
    monkeypatch.setattr(tsc, "IDLE_TIMEOUT_S", 0.0)

    async def main():
        async with serving(streamed) as (s, up):
            await collect(up)
            await asyncio.sleep(0.01)
            assert await collect(up) == [FRAME_A, FRAME_B, LAST]
            async with asyncio.timeout(HANG):
                await s.closed.wait()
        assert [len(c) for c in s.connections] == [1, 1]
        assert s.closed_by_client[0] == 0
    run(main())


def test_an_error_answer_keeps_its_connection_for_the_next_request(run):
    async def answer(req, writer, n):
        if n == 0:
            body = b'{"code": 503, "type": "ServiceUnavailableException", "message": "no worker"}'
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\nconnection: keep-alive\r\n\r\n%s" % (len(body), body))
        else:
            await streamed(req, writer, n)

    async def main():
        async with serving(answer) as (s, up):
            with pytest.raises(UpstreamError) as e:
                await collect(up)
            assert await collect(up) == [FRAME_A, FRAME_B, LAST]
        assert (e.value.status, e.value.message) == (503, "model server is overloaded or has no healthy worker")
        assert [len(c) for c in s.connections] == [2]
    run(main())


def test_closing_a_stream_early_closes_its_connection(run):
    """The client left: the gateway closes the frames; TorchServe must see the connection go (it then drops
    the job), and the next request gets a connection of its own."""
    async def answer(req, writer, n):
        if n == 0:
            writer.write(HEAD_200 + chunk(line(FRAME_A)))  # and the rest never comes
        else:
            await streamed(req, writer, n)

    async def main():
        async with serving(answer) as (s, up):
            frames = up.frames("lm", BODY)
            async with asyncio.timeout(HANG):
                assert await frames.__anext__() == FRAME_A
                await frames.aclose()
                await s.closed.wait()
            assert s.closed_by_client == [0]
            assert await collect(up) == [FRAME_A, FRAME_B, LAST]
        assert [len(c) for c in s.connections] == [1, 1]
    run(main())


def test_a_slow_reader_pauses_the_connection_and_still_gets_every_frame(run, monkeypatch):
    monkeypatch.setattr(tsc, "HIGH_WATER", 200)
    monkeypatch.setattr(tsc, "LOW_WATER", 50)
    paused = []
    on_body = tsc._Connection.on_body

    def spy(self, data):
        on_body(self, data)
        paused.append(self.paused)
    monkeypatch.setattr(tsc._Connection, "on_body", spy)
    many = [{"text": f"frame {i:04d} " + "x" * 40} for i in range(200)]

    async def answer(req, writer, n):
        writer.write(HEAD_200 + b"".join(chunk(line(f)) for f in many) + chunk(line(LAST)) + END)

    async def main():
        async with serving(answer) as (s, up):
            assert await collect(up) == many + [LAST]
            assert await collect(up) == many + [LAST]
        assert [len(c) for c in s.connections] == [2]  # resumed and read to its end: reused
    run(main())
    assert any(paused)


# errors

@pytest.mark.parametrize("address", ["tcp", "unix"])
def test_a_refused_connection_answers_503_at_once(run, tmp_path, address):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there, nor on the Unix socket's path
    url = f"http://127.0.0.1:{port}" if address == "tcp" else f"unix:{tmp_path / 'none.sock'}"

    async def main():
        up = Upstream(Settings(ts_url=url, ts_token_auth=False))
        try:
            with pytest.raises(UpstreamError) as e:
                await collect(up)
        finally:
            await up.close()
        return e.value
    err = run(main())
    assert (err.status, err.message, err.reason) == (503, "model server is not reachable", "unavailable")


def test_no_answer_within_the_read_timeout_answers_504(run):
    async def silent(req, writer, n):
        await asyncio.sleep(HANG)

    err = run_failing(run, silent, request_timeout_s=0.3)
    assert (err.status, err.message, err.reason) == (504, "model server did not answer in time", "timeout")


def test_a_stream_that_stalls_after_its_headers_answers_504(run):
    async def stall(req, writer, n):
        writer.write(HEAD_200 + chunk(line(FRAME_A)))
        await writer.drain()
        await asyncio.sleep(HANG)

    err = run_failing(run, stall, request_timeout_s=0.3)
    assert (err.status, err.reason) == (504, "timeout")


def test_a_connection_cut_mid_stream_is_a_worker_failure(run):
    async def cut(req, writer, n):
        writer.write(HEAD_200 + chunk(line(FRAME_A)))
        return False  # closed without the terminating chunk, as TorchServe does when a worker dies

    err = run_failing(run, cut)
    assert (err.status, err.message) == (502, "model server ended the stream early (worker failure)")


def test_a_stream_that_ends_without_its_last_frame_is_a_worker_failure(run):
    async def short(req, writer, n):
        writer.write(HEAD_200 + chunk(line(FRAME_A)) + END)

    err = run_failing(run, short)
    assert (err.status, err.message) == (502, "model server ended the stream early (worker failure)")


def test_a_malformed_frame_answers_502(run):
    async def garbage(req, writer, n):
        writer.write(HEAD_200 + chunk(b"{not json\n") + END)

    err = run_failing(run, garbage)
    assert (err.status, err.message) == (502, "model server sent a malformed frame")


def test_an_unreadable_answer_is_a_worker_failure(run):
    async def garbage(req, writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n")

    err = run_failing(run, garbage)
    assert (err.status, err.message) == (502, "model server ended the stream early (worker failure)")


def test_a_frame_over_the_size_bound_answers_502(run, monkeypatch):
    async def big(req, writer, n):
        writer.write(HEAD_200)
        for _ in range(8):  # 800 bytes and no newline, over several reads
            writer.write(chunk(b"x" * 100))
            await writer.drain()
            await asyncio.sleep(0.01)
        await asyncio.sleep(HANG)

    async def main():
        async with serving(big) as (_, up):
            up.torchserve.max_line_bytes = 500
            with pytest.raises(UpstreamError) as e:
                await collect(up)
        return e.value
    err = run(main())
    assert (err.status, err.message) == (502, "model server sent a frame over the size bound")


@pytest.mark.parametrize("status, message, expected", [
    (503, "No worker is available to serve request: lm", (503, "model server is overloaded or has no healthy worker")),
    (404, "Model not found: lm", (503, "model is not loaded on the model server")),
    (413, "request too large", (413, "request too large for the model server")),
    (500, "boom", (502, "model server error (500)")),
    (400, "Token Authorization failed. Token either incorrect, expired, or not provided correctly",
     (503, "model server refused the gateway's credentials")),
])
def test_error_statuses_become_the_gateways(run, status, message, expected):
    async def answer(req, writer, n):
        body = json.dumps({"code": status, "type": "X", "message": message}).encode()
        writer.write(b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (status, len(body), body))

    err = run_failing(run, answer)
    assert (err.status, err.message) == expected


def test_an_error_answer_whose_body_ends_with_its_connection(run):
    async def answer(req, writer, n):
        writer.write(b'HTTP/1.1 404 Not Found\r\nconnection: close\r\n\r\n{"message": "Model not found: lm"}')
        return False

    err = run_failing(run, answer)
    assert (err.status, err.message) == (503, "model is not loaded on the model server")


def test_a_refused_token_is_read_again_on_the_next_request(run, tmp_path):
    key_file = tmp_path / "key_file.json"

    def keys(key: str) -> None:
        key_file.write_text(json.dumps({"inference": {"key": key, "expiration time": "2999-01-01T00:00:00Z"},
                                        "API": {"key": "ap1ap1ap"}}))

    async def answer(req, writer, n):
        if req.header("authorization") != "Bearer n3wk3yyy":
            body = b'{"code": 401, "message": "Token Authorization failed"}'
            writer.write(b"HTTP/1.1 401 X\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        else:
            await streamed(req, writer, n)

    async def main():
        keys("0ldk3yyy")
        async with stand_in(answer) as s:
            up = Upstream(Settings(ts_url=f"http://127.0.0.1:{s.port}", ts_token_auth=True, ts_key_file=key_file))
            try:
                with pytest.raises(UpstreamError) as e:
                    await collect(up)
                assert e.value.status == 503
                keys("n3wk3yyy")  # TorchServe restarted with new keys
                assert await collect(up) == [FRAME_A, FRAME_B, LAST]
            finally:
                await up.close()
    run(main())


# connecting: a timeout is tried again until the request's own deadline, a refusal fails at once

class FlakyClient:
    """Connecting times out `fails` times, then the request goes through."""

    def __init__(self, fails: int, error: Exception) -> None:
        self.fails, self.error, self.calls = fails, error, 0

    async def post(self, path, body, headers):
        self.calls += 1
        if self.calls <= self.fails:
            raise self.error
        return "response"


def test_a_connect_timeout_is_tried_again_until_it_connects():
    client = FlakyClient(2, tsc.ConnectTimeout("connect timed out"))
    assert asyncio.run(Upstream._post(client, "/p", b"{}", {})) == "response"
    assert client.calls == 3


def test_a_refused_connection_is_not_tried_again():
    client = FlakyClient(1, tsc.ConnectError("refused"))
    with pytest.raises(tsc.ConnectError):
        asyncio.run(Upstream._post(client, "/p", b"{}", {}))
    assert client.calls == 1


def test_the_callers_deadline_ends_the_retries():
    class SlowTimeouts:
        calls = 0

        async def post(self, path, body, headers):
            self.calls += 1
            await asyncio.sleep(0.01)  # as a real connect attempt takes time
            raise tsc.ConnectTimeout("connect timed out")

    client = SlowTimeouts()

    async def bounded():
        async with asyncio.timeout(0.2):  # the request's deadline (Run.next) or the readiness probe's bound
            await Upstream._post(client, "/p", b"{}", {})

    with pytest.raises(TimeoutError):
        asyncio.run(bounded())
    assert client.calls > 1


def test_a_connect_that_times_out_raises_connect_timeout(monkeypatch):
    """The client's own connect bound: a connection attempt that hangs becomes ConnectTimeout."""
    async def main():
        client = tsc.TorchServeClient("http://127.0.0.1:9", 0.05, 5.0, 1000)
        loop = asyncio.get_running_loop()

        async def hang(*a, **k):
            await asyncio.sleep(HANG)
        monkeypatch.setattr(loop, "create_connection", hang)
        with pytest.raises(tsc.ConnectTimeout):
            await client.post("/p", b"{}", {})
    asyncio.run(main())


def test_a_header_with_a_line_break_is_refused():
    async def main():
        client = tsc.TorchServeClient("http://127.0.0.1:9", 1.0, 5.0, 1000)
        with pytest.raises(ValueError):
            await client.post("/p", b"{}", {"X-Request-Id": "a\r\nEvil: 1"})
    asyncio.run(main())


def test_connect_opens_connections_that_the_next_requests_take(run):
    """A client that connects first (the benchmarks' load generator): n connections before any request, and n
    requests at once go out over exactly those."""
    async def main():
        async with stand_in(streamed) as s:
            client = tsc.TorchServeClient(f"http://127.0.0.1:{s.port}", 5, HANG, 1 << 20)
            try:
                await client.connect(3)
                async with asyncio.timeout(HANG):
                    while len(s.connections) < 3:  # the stand-in's side of each accept
                        await asyncio.sleep(0.01)
                assert s.connections == [[], [], []]

                async def one(i: int) -> list[bytes]:
                    resp = await client.post("/predictions/lm", json.dumps({"seed": i}).encode(), {})
                    lines = [ln async for ln in _lines(resp)]
                    resp.release()
                    return lines

                async with asyncio.timeout(HANG):
                    got = await asyncio.gather(*(one(i) for i in range(3)))
            finally:
                await client.close()
        assert got == [[line(FRAME_A)[:-1], line(FRAME_B)[:-1], line(LAST)[:-1]]] * 3
        assert [len(c) for c in s.connections] == [1, 1, 1]
    run(main())


def test_connect_keeps_no_connection_when_one_fails(run):
    async def main():
        with socket.socket() as sock:  # a port nobody listens on
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        client = tsc.TorchServeClient(f"http://127.0.0.1:{port}", 5, HANG, 1 << 20)
        with pytest.raises(tsc.ConnectError):
            await client.connect(2)
        assert client.idle == []
    run(main())


async def _lines(resp: tsc.Response):
    while (got := await resp.readline()) is not None:
        yield got
