"""A lean HTTP/1.1 client for TorchServe's inference streams: keep-alive connections and NDJSON lines.

The gateway sends every generation to TorchServe as one POST and reads its answer as one JSON line per
frame over a chunked body. A general client (aiohttp) spends CPU on every request and frame for what this
path never needs: URL, cookie and header machinery, a request writer, a connector with per-host
bookkeeping, a stream reader (BENCHMARKS.md measures both). Here an asyncio Protocol per connection feeds httptools'
response parser (uvicorn's), the de-chunked body is split into lines as it arrives, and idle connections
wait in a pool for the next request. The benchmarks drive the gateway's streams with it too (rnnserve/bench):
a load generator that shares the cores with the stack should cost as little as it can.

Errors are this module's own exceptions; service/gateway/upstream.py turns them into the gateway's answers.
"""
from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Mapping
from urllib.parse import urlsplit

import httptools

# pause reading a stream once this many bytes of complete lines wait for the gateway to take them (a slow
# client), resume below LOW_WATER: bounds what one stream holds in memory; a single frame may be larger
HIGH_WATER = 1024 * 1024
LOW_WATER = HIGH_WATER // 4
# a connection idle longer than this is closed rather than reused: the server (or a proxy between) may
# have closed its end meanwhile, and a request sent just then would fail (aiohttp's default keep-alive)
IDLE_TIMEOUT_S = 15.0
# an error answer's body is read up to this many bytes (TorchServe's are short JSON messages)
MAX_ERROR_BODY = 64 * 1024


class ClientError(Exception):
    """Base of what this client raises."""


class ConnectError(ClientError):
    """The connection could not be made (refused, no route, unknown host)."""


class ConnectTimeout(ClientError):
    """Connecting took longer than the connect timeout: nothing reached the server."""


class ReadTimeout(ClientError):
    """The server sent nothing for the read timeout while an answer was awaited."""


class Disconnected(ClientError):
    """The connection ended (or sent something unreadable) before the answer was complete."""


class LineTooLong(ClientError):
    """One line of the body is over the bound."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; holds the state of the answer being read on it."""

    def __init__(self, client: TorchServeClient) -> None:
        self.client = client
        self.loop = client.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.waiter: asyncio.Future | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.last_read = 0.0
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.busy = False
        self.status = 0
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.exc: ClientError | None = None
        self.lines: deque[bytes] = deque()
        self.buffered = 0
        self.partial = bytearray()
        self.error_body: bytearray | None = None
        self.paused = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # an idle connection has nothing to say: whatever it is, the connection is spoiled
            self.transport.close()
            return
        self.last_read = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(Disconnected(f"unreadable answer: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.busy and not self.complete and self.exc is None:
            if self.error_body is not None:  # an error answer's body may end with its connection
                self.complete = True
            else:
                self.exc = Disconnected("connection closed before the answer was complete")
            self._wake()

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True
        if self.status != 200:
            self.error_body = bytearray()
        self._wake()

    def on_body(self, data: bytes) -> None:
        if self.exc is not None:  # failed within this read: the rest of it is of no use
            return
        if self.error_body is not None:
            if len(self.error_body) < MAX_ERROR_BODY:
                self.error_body += data[:MAX_ERROR_BODY - len(self.error_body)]
            return
        if b"\n" not in data:
            self.partial += data
            if len(self.partial) > self.client.max_line_bytes:
                self._fail(LineTooLong(f"a line over {self.client.max_line_bytes} bytes"))
            return
        if self.partial:
            self.partial += data
            data = bytes(self.partial)
            self.partial = bytearray()
        parts = data.split(b"\n")
        last = parts.pop()
        for part in parts:
            if part:
                self.lines.append(part)
                self.buffered += len(part)
        if last:
            self.partial += last
            if len(self.partial) > self.client.max_line_bytes:
                self._fail(LineTooLong(f"a line over {self.client.max_line_bytes} bytes"))
                return
        if self.buffered > HIGH_WATER and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        if self.partial:  # the body's last line need not end with a newline
            self.lines.append(bytes(self.partial))
            self.partial = bytearray()
        self._wake()

    # the reader's side
    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, exc: ClientError) -> None:
        if self.exc is None:
            self.exc = exc
        self.close()
        self._wake()

    async def wait(self) -> None:
        """Until the parser reports something (or the read timeout passes without data)."""
        self.waiter = waiter = self.loop.create_future()
        if self.timer is None:  # one timer per connection, moved on lazily rather than at every read
            self.timer = self.loop.call_at(self.last_read + self.client.read_timeout_s, self._on_timer)
        await waiter

    def _on_timer(self) -> None:
        self.timer = None
        if self.waiter is None or self.waiter.done():
            return
        due = self.last_read + self.client.read_timeout_s
        if self.loop.time() >= due:
            self._fail(ReadTimeout(f"nothing received for {self.client.read_timeout_s:g}s"))
        else:
            self.timer = self.loop.call_at(due, self._on_timer)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def usable(self) -> bool:
        return not self.closed and not self.transport.is_closing()


class Response:
    """One answer: its status, then its body as lines (or as text for an error answer). Call `release`
    when done with it: a finished answer's connection goes back to the pool, an unfinished one is closed
    (TorchServe then drops the job)."""

    __slots__ = ("_conn", "status")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = conn.status

    async def readline(self) -> bytes | None:
        """The next non-empty line of the body without its newline; None at the end of the body."""
        conn = self._conn
        while True:
            if conn.lines:
                line = conn.lines.popleft()
                conn.buffered -= len(line)
                if conn.paused and conn.buffered < LOW_WATER:
                    conn.paused = False
                    conn.transport.resume_reading()
                return line
            if conn.exc is not None:
                raise conn.exc
            if conn.complete:
                return None
            await conn.wait()

    async def text(self) -> str:
        """The whole body of an error answer (up to MAX_ERROR_BODY bytes), decoded."""
        conn = self._conn
        while not conn.complete:
            if conn.exc is not None:
                raise conn.exc
            await conn.wait()
        body = conn.error_body if conn.error_body is not None else b"\n".join(conn.lines)
        return bytes(body).decode("utf-8", "replace")

    async def finish(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for the end of the body (its terminating chunk follows the last frame at
        once), so that `release` can reuse the connection; whatever is left unread is dropped."""
        conn = self._conn
        conn.lines.clear()
        conn.buffered = 0
        if conn.paused:
            conn.paused = False
            conn.transport.resume_reading()
        if conn.complete or conn.exc is not None:
            return
        try:
            async with asyncio.timeout(timeout_s):
                while not conn.complete and conn.exc is None:
                    await conn.wait()
        except TimeoutError:
            pass  # release closes the connection instead of reusing it; the answer is complete either way

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.client._release(conn)


class TorchServeClient:
    """POSTs JSON bodies to one TorchServe inference address over pooled keep-alive connections. No limit
    on open connections: the gateway's admission bounds the streams in flight."""

    def __init__(self, url: str, connect_timeout_s: float, read_timeout_s: float, max_line_bytes: int,
                 max_idle: int = 1024) -> None:
        # unix:/path/to.sock: TorchServe's inference address on a Unix socket (settings.ts_inference_socket)
        self.unix_path = url[len("unix:"):] if url.startswith("unix:") else None
        parts = urlsplit("http://localhost" if self.unix_path else url)
        self.host = parts.hostname or "localhost"
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.port = parts.port or (443 if self.ssl else 80)
        self.prefix = parts.path.rstrip("/")
        self.host_header = parts.netloc
        self.connect_timeout_s, self.read_timeout_s = connect_timeout_s, read_timeout_s
        self.max_line_bytes, self.max_idle = max_line_bytes, max_idle
        self.idle: list[_Connection] = []  # most recently used last: taken first, while its socket is warm
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def address(self) -> str:
        return self.unix_path or f"{self.host}:{self.port}"

    async def post(self, path: str, body: bytes, headers: Mapping[str, str]) -> Response:
        """Send the request and wait for the answer's status line and headers."""
        head = [f"POST {self.prefix}{path} HTTP/1.1\r\nHost: {self.host_header}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"]
        for name, value in headers.items():
            if "\r" in value or "\n" in value:
                raise ValueError(f"header {name} holds a line break")
            head.append(f"{name}: {value}\r\n")
        head.append("\r\n")
        conn = await self._acquire()
        conn.busy = True
        conn.last_read = conn.loop.time()
        conn.transport.write("".join(head).encode("latin-1") + body)
        try:
            while not conn.headers_done:
                if conn.exc is not None:
                    raise conn.exc
                await conn.wait()
        except BaseException:
            conn.close()
            raise
        return Response(conn)

    async def _acquire(self) -> _Connection:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        now = self.loop.time()
        while self.idle:
            conn = self.idle.pop()
            if now - conn.idle_since > IDLE_TIMEOUT_S:  # and so are all before it: idle is in release order
                stale, self.idle = self.idle, []
                for c in [conn, *stale]:
                    c.close()
                break
            if conn.usable():
                return conn
        return await self._open()

    async def connect(self, n: int) -> None:
        """Open `n` connections into the pool at once, as a client that keeps its connections open has them
        before its first request."""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        opened = await asyncio.gather(*(self._open() for _ in range(n)), return_exceptions=True)
        conns = [c for c in opened if isinstance(c, _Connection)]
        failed = [e for e in opened if isinstance(e, BaseException)]
        if failed:  # none is kept: the caller asked for all of them
            for conn in conns:
                conn.close()
            raise failed[0]
        now = self.loop.time()
        for conn in conns:
            conn.idle_since = now
        self.idle.extend(conns)

    async def _open(self) -> _Connection:
        conn = _Connection(self)
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if self.unix_path:
                    await self.loop.create_unix_connection(lambda: conn, self.unix_path)
                else:
                    await self.loop.create_connection(lambda: conn, self.host, self.port, ssl=self.ssl)
        except TimeoutError:  # before OSError: TimeoutError is one
            conn.close()
            raise ConnectTimeout(f"connecting to {self.address} timed out") from None
        except OSError as e:
            raise ConnectError(f"cannot connect to {self.address}: {e}") from e
        return conn

    def _release(self, conn: _Connection) -> None:
        reusable = conn.complete and conn.exc is None and conn.keep_alive and not conn.paused
        if reusable and conn.usable() and len(self.idle) < self.max_idle:
            conn._reset()
            conn.idle_since = self.loop.time()
            self.idle.append(conn)
        else:
            conn.close()

    async def close(self) -> None:
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()
