"""Generation and translation through TorchServe: one upstream stream per sequence, with the
request's deadline, admission slot and metrics.

Routes `start` runs, then either `collect` them (a JSON answer) or stream them as Server-Sent
Events. The first frame is awaited before the HTTP status is chosen, so a request that fails at
once gets a real error status; a failure after that arrives as the stream's last event, never as a
cut stream. A client that goes away cancels the SSE generator; closing the runs then closes the
upstream streams, TorchServe drops the jobs and the handler frees their rows at the next step.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import anyio
from pydantic_core import to_json
from starlette.responses import Response

from rnnserve.service.gateway.admission import Admission
from rnnserve.service.gateway.connections import ABORT, WRITE_PAUSED
from rnnserve.service.gateway.errors import APIError
from rnnserve.service.gateway.metrics import Metrics
from rnnserve.service.gateway.upstream import Upstream, UpstreamError

log = logging.getLogger(__name__)

UPSTREAM_ERROR_TYPES = {400: "invalid_request_error", 413: "invalid_request_error", 503: "unavailable_error",
                        504: "timeout_error"}


def upstream_api_error(e: UpstreamError) -> APIError:
    return APIError(e.status, e.message, UPSTREAM_ERROR_TYPES.get(e.status, "upstream_error"))


def frame_api_error(frame: dict) -> APIError:
    err = frame["error"]
    status = 400 if err.get("code") == 400 else 502
    return APIError(status, err.get("message", "generation failed"), err.get("type", "upstream_error"),
                    err.get("param") if status == 400 else None)


def frame_text(frame: dict) -> str:
    """New text of a frame: generation frames carry "text", translation frames "deltas"."""
    if "deltas" in frame:
        return "".join(d.get("text", "") for d in frame["deltas"])
    return frame.get("text", "")


@dataclass
class Context:
    """What every run of one HTTP request shares."""
    upstream: Upstream
    metrics: Metrics
    admission: Admission
    model: str
    route: str
    request_id: str
    deadline: float


class Run:
    """One upstream stream: frames pulled under the request's deadline, metrics recorded."""

    def __init__(self, ctx: Context, body: dict, index: int = 0, cost: int = 0) -> None:
        self.ctx, self.index, self.cost = ctx, index, cost  # cost: its tokens held in admission (cost.py)
        self._frames = ctx.upstream.frames(ctx.model, body)
        self._metrics = ctx.metrics.stream(ctx.model)
        self.t0 = time.monotonic()
        self._last_text_at: float | None = None
        self.outcome = "internal"
        self.final: dict | None = None
        self._closed = False
        self.logprobs: list[dict] = []  # token logprobs of the whole text, when asked
        self.prompt_logprobs: list[dict] = []  # echo
        self.score_logprobs: dict[int, list[dict]] = {}  # scoring with token_logprobs: per text, as read
        # the deadline: one timer per run, which cancels the task waiting in `next` when it passes (an
        # asyncio.timeout per frame armed and cancelled a timer for every frame, ~8% of the gateway's CPU)
        self._waiter: asyncio.Task | None = None
        self._expired = self._deadline_cancelled = False
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_later(max(0.0, ctx.deadline - time.monotonic()), self._expire)

    def _expire(self) -> None:
        self._expired = True
        if self._waiter is not None:
            self._deadline_cancelled = True
            self._waiter.cancel()

    @property
    def finish_reason(self) -> str | None:
        return self.final.get("finish_reason") if self.final else None

    async def next(self) -> dict | None:
        """The next frame, None after the last one; raises APIError (timeout, upstream failure)."""
        if self.final is not None:
            return None
        try:
            if self._expired or time.monotonic() >= self.ctx.deadline:
                raise TimeoutError
            # with its loop given, current_task skips get_running_loop, whose check of the process id is a
            # system call (getpid) on every frame
            self._waiter = asyncio.current_task(self._loop)
            try:
                frame = await self._frames.__anext__()
            finally:
                self._waiter = None
        except StopAsyncIteration:
            return None
        except (TimeoutError, asyncio.CancelledError) as e:
            if isinstance(e, asyncio.CancelledError):
                if not self._deadline_cancelled:
                    raise
                self._deadline_cancelled = False
                asyncio.current_task(self._loop).uncancel()  # type: ignore[union-attr]
            self.outcome = "timeout"
            raise APIError(504, "the request did not finish before its deadline", "timeout_error") from None
        except UpstreamError as e:
            self.outcome = "timeout" if e.reason == "timeout" else "upstream"
            raise upstream_api_error(e) from None
        if "error" in frame:
            err = frame_api_error(frame)
            self.outcome = "validation" if err.status == 400 else "upstream"
            raise err
        self._record(frame)
        return frame

    def _record(self, frame: dict) -> None:
        now = time.monotonic()
        text = frame_text(frame)
        self.logprobs += frame.get("logprobs") or []
        self.prompt_logprobs += frame.get("prompt_logprobs") or []
        for part in frame.get("score_logprobs") or []:
            self.score_logprobs.setdefault(part["index"], []).extend(part["logprobs"])
        m = self._metrics
        if "batch" in frame:
            m.batch_size.observe(frame["batch"])
        if text:
            if self._last_text_at is None:
                m.ttft.observe(now - self.t0)
            else:
                m.itl.observe((now - self._last_text_at) / len(text))
            self._last_text_at = now
        if frame.get("finish_reason"):
            self.final = frame
            self.outcome = frame["finish_reason"]
            usage = frame.get("usage") or {}
            p, c = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
            m.prompt_tokens.inc(p)
            m.generation_tokens.inc(c)
            m.prompt_tokens_per_request.observe(p)
            m.generation_tokens_per_request.observe(c)

    async def close(self, disconnected: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        self._timer.cancel()
        model = self.ctx.model
        if disconnected and self.final is None:
            self.outcome = "cancelled"
            self._metrics.cancelled.inc()
        # bookkeeping first: the await below may be interrupted when the request is being cancelled
        self.ctx.admission.release(1, self.cost)
        self._metrics.e2e.observe(time.monotonic() - self.t0)
        self.ctx.metrics.request_done(model, self.ctx.route, self.outcome)
        log.info("%s %s on %s: %s in %.3fs", self.ctx.route, self.ctx.request_id, model, self.outcome,
                 time.monotonic() - self.t0)
        await self._frames.aclose()  # closes the upstream connection: TorchServe drops the job


async def start(ctx: Context, bodies: list[dict], costs: list[int] | None = None) -> list[tuple[Run, dict]]:
    """Admit and open one run per body and wait for each first frame. `costs`: each body's tokens
    (service/gateway/cost.py), held against the model's budget until its run closes.

    Raises APIError (and leaves nothing open) when admission or any first frame fails.
    """
    costs = costs or [0] * len(bodies)
    try:
        await ctx.admission.acquire(len(bodies), timeout_s=max(0.0, ctx.deadline - time.monotonic()),
                                    cost=sum(costs))
    except APIError as e:
        outcome = "overloaded" if e.status == 429 else "validation"
        ctx.metrics.request_done(ctx.model, ctx.route, outcome)
        raise
    except TimeoutError:
        ctx.metrics.request_done(ctx.model, ctx.route, "timeout")
        raise APIError(504, "the request waited for capacity past its deadline", "timeout_error") from None
    runs = [Run(ctx, body, i, cost) for i, (body, cost) in enumerate(zip(bodies, costs))]
    if len(runs) == 1:  # most requests: no task of its own to wait in
        try:
            firsts: list = [await runs[0].next()]
        except Exception as e:
            firsts = [e]
    else:
        firsts = await asyncio.gather(*(r.next() for r in runs), return_exceptions=True)
    failed = next((f for f in firsts if isinstance(f, BaseException)), None)
    if failed is not None or any(f is None for f in firsts):
        await asyncio.gather(*(r.close() for r in runs))
        if isinstance(failed, BaseException):
            raise failed
        raise APIError(502, "model server sent no frames", "upstream_error")
    return list(zip(runs, firsts))


async def collect(started: list[tuple[Run, dict]]) -> list[tuple[Run, str]]:
    """Whole text of every run (non-streaming answers)."""
    async def one(run: Run, first: dict) -> str:
        parts = [frame_text(first)]
        frame = await run.next()
        while frame is not None:
            parts.append(frame_text(frame))
            frame = await run.next()
        if run.final is None:
            raise APIError(502, "model server ended the stream early", "upstream_error")
        return "".join(parts)

    cancelled = False
    try:
        texts = await asyncio.gather(*(one(r, f) for r, f in started))
    except asyncio.CancelledError:
        cancelled = True  # the client went away (see collect_unless_disconnected)
        raise
    finally:
        with anyio.CancelScope(shield=True):
            for run, _ in started:
                await run.close(disconnected=cancelled)
    return [(r, t) for (r, _), t in zip(started, texts)]


async def collect_unless_disconnected(request, started: list[tuple[Run, dict]]) -> list[tuple[Run, str]] | None:
    """`collect`, stopped as soon as the client disconnects (then None): a plain JSON request whose
    caller left must free its batch rows too, not decode to the end for nobody."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.create_task(collect(started))
    watch = asyncio.create_task(disconnected())
    done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    if work in done:
        watch.cancel()
        return work.result()
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    return None


DONE = b"data: [DONE]\n\n"


def sse(data: dict) -> bytes:
    """One Server-Sent Event (pydantic-core's encoder: UTF-8, several times faster than the json module)."""
    return b"data: " + to_json(data) + b"\n\n"


async def merged_frames(started: list[tuple[Run, dict]]) -> AsyncIterator[tuple[Run, dict]]:
    """Frames of several runs as they arrive (first frames first); APIError of any run ends it."""
    for run, first in started:
        yield run, first
    if len(started) == 1:
        run = started[0][0]
        while (frame := await run.next()) is not None:
            yield run, frame
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(run: Run) -> None:
        try:
            while (frame := await run.next()) is not None:
                await queue.put((run, frame))
        except APIError as e:
            await queue.put(e)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(r)) for r, _ in started]
    try:
        done = 0
        while done < len(tasks):
            item = await queue.get()
            if item is None:
                done += 1
            elif isinstance(item, APIError):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# an SSE answer's headers, before the request id (the same on both paths: routes.py and fastpath.py)
SSE_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"),
               (b"content-type", b"text/event-stream; charset=utf-8")]


async def serve_events(scope, receive, send, headers: list[tuple[bytes, bytes]], events: AsyncIterator[bytes],
                       deadline: float) -> None:
    """Send an SSE answer (status 200, `headers`, then `events`, which end with [DONE]) as plain ASGI messages.

    - The request's deadline holds while it writes too: a client that stops reading blocks the write, and
      nothing else would end the request. When the deadline passes in a blocked write, the events are closed
      (their runs' slots freed, the generations stopped upstream) and the connection is dropped.
    - A client that goes away cancels the events at once (a watcher on `receive`, as Starlette's
      StreamingResponse does for servers of ASGI spec 2.3), whatever they are waiting for.
    - The events that end with [DONE] go out with the end of the body: one write (the same bytes on the wire).
    """
    extensions = scope.get("extensions") or {}
    paused = extensions.get(WRITE_PAUSED)

    async def write(message) -> None:
        if paused is not None and not paused():  # the write cannot block: no timer (~20 us an event)
            return await send(message)
        while True:
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    return await send(message)
            except TimeoutError:
                # uvloop's clock (libuv's, in whole milliseconds, read once per loop turn) lags time.monotonic():
                # its timer may fire just before the deadline, and the stream would then count as cancelled,
                # not timed out (sse_stream). Nothing was written: the message is sent again until then.
                if time.monotonic() >= deadline:
                    raise _WriteTimedOut from None

    task = asyncio.current_task()
    armed, left = True, False  # armed: a disconnect cancels this task (until the body is complete)

    async def watch() -> None:
        nonlocal left
        while (await receive())["type"] != "http.disconnect":
            pass
        if armed:
            left = True
            task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        await write({"type": "http.response.start", "status": 200, "headers": headers})
        complete = False
        async for chunk in events:
            complete = chunk.endswith(DONE)
            await write({"type": "http.response.body", "body": chunk, "more_body": not complete})
            armed = not complete  # what remains is the runs' clean-up: a disconnect must not cut it short
        armed = False
        if not complete:
            await write({"type": "http.response.body", "body": b"", "more_body": False})
    except asyncio.CancelledError:
        armed = False
        if not left:
            raise
        task.uncancel()  # the client left: the events close as disconnected (their slots freed at once)
        await events.aclose()  # type: ignore[attr-defined]
    except _WriteTimedOut:
        armed = False
        log.warning("the request's deadline passed while its client was not reading: stream dropped")
        await events.aclose()  # type: ignore[attr-defined]
        abort = extensions.get(ABORT)
        if abort is not None:
            abort()
            await asyncio.sleep(0)  # the server marks the connection lost before the app returns
    finally:
        armed = False
        watcher.cancel()


class EventStream(Response):
    """An SSE answer of a FastAPI route, sent by `serve_events`."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], deadline: float) -> None:
        self.status_code, self.background = 200, None
        self.raw_headers = list(SSE_HEADERS)
        self.events, self.deadline = events, deadline

    async def __call__(self, scope, receive, send) -> None:
        await serve_events(scope, receive, send, self.raw_headers, self.events, self.deadline)


class _WriteTimedOut(Exception):
    pass


async def sse_stream(started: list[tuple[Run, dict]], render: Callable[[Run, dict], list[dict]],
                     trailer: Callable[[], list[dict]] | None = None,
                     on_final: Callable[[dict], Awaitable[None]] | None = None,
                     on_close: Callable[[], Awaitable[None]] | None = None) -> AsyncIterator[bytes]:
    """SSE body: the events `render` makes of each frame, `trailer`'s events, then [DONE]. The events of one
    frame go out as one write, and the last frame's with the trailer and [DONE]: each write costs the gateway
    about the same, whatever it carries. `on_final` runs before a run's finishing frame is rendered (a session
    stores its state before the answer that names it goes out); `on_close` once the runs are closed, however
    the stream ends."""
    disconnected = True
    frames = merged_frames(started)
    runs = [run for run, _ in started]
    try:
        held = b""  # the last frame's events, sent with the end
        try:
            async for run, frame in frames:
                if on_final is not None and frame.get("finish_reason"):
                    await on_final(frame)
                events = b"".join([sse(event) for event in render(run, frame)])
                if run.final is not None and all(r.final is not None for r in runs):
                    held = events
                elif events:
                    yield events
            held += b"".join([sse(event) for event in (trailer() if trailer else [])])
        except APIError as e:
            log.warning("request %s failed mid-stream: %s", started[0][0].ctx.request_id, e.message)
            held += sse(e.body())
        yield held + DONE
        disconnected = False
    finally:
        # a client that left cancels this generator (serve_events): shield the clean-up. Ended past the
        # deadline (serve_events: a write blocked), it timed out
        timed_out = disconnected and time.monotonic() >= started[0][0].ctx.deadline
        with anyio.CancelScope(shield=True):
            await frames.aclose()  # its pumps first: they may be reading the runs' upstream streams
            try:
                for run, _ in started:
                    if timed_out:  # its answer did not reach the client, however far it got upstream
                        run.outcome = "timeout"
                    await run.close(disconnected=disconnected and not timed_out)
            finally:
                if on_close is not None:
                    await on_close()
