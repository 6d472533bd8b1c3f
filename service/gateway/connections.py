"""Time bounds on the gateway's client connections, which uvicorn lacks: its keep-alive timeout only
runs between requests, so a client that sends half a request, or stops reading its answer, holds its
connection (and, for a stream, its admission slot) for ever.

`BoundedHttpToolsProtocol` is uvicorn's httptools protocol with:
- headers: a request's headers must be complete within `header_timeout_s` of the connection opening or
  of the previous response (an idle or slowly talking connection is closed);
- body: its body must be complete within `body_timeout_s` of its headers;
- writes: a connection whose output stays blocked (the client does not read) for `write_timeout_s` is
  dropped, its unsent bytes discarded;
- the kernel's send buffer per connection, when set (`send_buffer_bytes`): what a client that does not
  read can leave queued in the kernel (Linux grows it up to 4 MiB by default);
- `scope["extensions"]["rnnserve.abort"]`: lets the app drop the connection at once, which a stream
  does when its deadline passes during a blocked write (generation.py); `"rnnserve.write_paused"` says
  whether a write would block now (uvicorn's send suspends only then), so that the stream arms a
  timer only for such a write, not for every event;
- a response's head held back until its first body bytes (or the end of the event loop's turn): one write,
  one system call and one wake-up of the client for both, where uvicorn makes two.
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import socket
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

log = logging.getLogger(__name__)

ABORT = "rnnserve.abort"
WRITE_PAUSED = "rnnserve.write_paused"


@dataclass(frozen=True)
class ConnectionBounds:
    header_timeout_s: float
    body_timeout_s: float
    write_timeout_s: float
    send_buffer_bytes: int | None = None  # the kernel's send buffer per connection; None: its autotuning


class HeadHoldingTransport:
    """A connection's transport whose next write, once armed, waits for the write after it or for the end of
    the event loop's turn, whichever comes first. Armed before each response: its head then goes out with its
    first body bytes, which a stream's first event and a JSON answer send in the same turn. Order is kept: held
    bytes always go out before any later ones."""

    __slots__ = ("_armed", "_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop
        self._armed = False
        self._held: bytes | None = None

    def arm(self) -> None:
        self._armed = True

    def write(self, data: bytes) -> None:
        if self._held is not None:
            data, self._held = self._held + data, None
        elif self._armed:
            self._armed, self._held = False, bytes(data)
            self._loop.call_soon(self.flush)
            return
        self._transport.write(data)

    def writelines(self, chunks) -> None:
        self.write(b"".join(chunks))

    def flush(self) -> None:
        if self._held is not None:
            data, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def __getattr__(self, name: str):  # everything else is the transport's
        return getattr(self._transport, name)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args, bounds: ConnectionBounds, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bounds = bounds
        self._read_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(HeadHoldingTransport(transport, self.loop))  # type: ignore[arg-type]
        sock = transport.get_extra_info("socket")
        if self.bounds.send_buffer_bytes and sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.bounds.send_buffer_bytes)
        self._arm_read(self.bounds.header_timeout_s, "request headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read()
        self._cancel_write()
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        extensions = self.scope.setdefault("extensions", {})  # type: ignore[typeddict-item]
        extensions[ABORT] = self._abort
        flow = self.flow
        extensions[WRITE_PAUSED] = lambda: flow.write_paused
        self._arm_read(self.bounds.body_timeout_s, "request body")

    def _start_asgi_task(self, cycle: RequestResponseCycle, app) -> None:
        # each response's head waits for its first body bytes (an "100 Continue" must not wait)
        if not cycle.waiting_for_100_continue:
            self.transport.arm()  # type: ignore[attr-defined]
        super()._start_asgi_task(cycle, app)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._cancel_read()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.cycle.response_complete:  # not a pipelined next request
            self._arm_read(self.bounds.header_timeout_s, "request headers")

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.bounds.write_timeout_s, self._write_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_write()

    # -- timers --------------------------------------------------------------------------------
    def _arm_read(self, seconds: float, what: str) -> None:
        self._cancel_read()
        # a fresh context: the timer is the connection's, not the request's whose callback armed it
        self._read_timer = self.loop.call_later(seconds, self._read_late, what, seconds, context=contextvars.Context())

    def _cancel_read(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _cancel_write(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _read_late(self, what: str, seconds: float) -> None:
        self._read_timer = None
        if not self.transport.is_closing():
            log.info("closing the connection from %s: %s not received within %gs", _peer(self.client), what,
                     seconds)
            self.transport.close()

    def _write_stalled(self) -> None:
        self._write_timer = None
        log.info("dropping the connection to %s: it read nothing for %gs", _peer(self.client),
                 self.bounds.write_timeout_s)
        self._abort()

    def _abort(self) -> None:
        """Close at once, unsent bytes discarded (a plain close waits for a client that may never read)."""
        self.transport.abort()


def _peer(client: tuple[str, int] | None) -> str:
    return "%s:%d" % client if client else "?"


def protocol_factory(bounds: ConnectionBounds):
    """For uvicorn.Config(http=...): a factory of bounded protocols."""
    return functools.partial(BoundedHttpToolsProtocol, bounds=bounds)
