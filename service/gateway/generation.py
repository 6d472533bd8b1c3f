"""Generation through TorchServe: one upstream stream per request, with deadline and metrics.

Routes call `open_run` and then either `collect` (a JSON answer) or `sse` (Server-Sent Events).
The first frame is awaited before the HTTP status is chosen, so a request that fails at once gets a
real error status; a failure after that arrives as the stream's last event, never as a cut stream.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

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
    code = int(err.get("code", 500)) if str(err.get("code", "")).isdigit() else 500
    status = 400 if code == 400 else 502
    return APIError(status, err.get("message", "generation failed"), err.get("type", "upstream_error"))


class Run:
    """One upstream generation: frames pulled under the request's deadline, metrics recorded."""

    def __init__(self, upstream: Upstream, metrics: Metrics, model: str, body: dict, request_id: str,
                 timeout_s: float) -> None:
        self.model, self.metrics, self.request_id = model, metrics, request_id
        self._frames = upstream.frames(model, body, request_id)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + timeout_s
        self._last_text_at: float | None = None
        self.outcome = "internal"
        self.usage: dict | None = None
        self.finish_reason: str | None = None
        self._closed = False
        metrics.running.labels(model=model).inc()

    async def next(self) -> dict | None:
        """The next frame, None after the last one; raises APIError (timeout, upstream failure)."""
        if self.finish_reason:
            return None
        remaining = self.deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            async with asyncio.timeout(remaining):
                frame = await self._frames.__anext__()
        except StopAsyncIteration:
            return None
        except TimeoutError:
            self.outcome = "timeout"
            raise APIError(504, "the request did not finish before its deadline", "timeout_error") from None
        except UpstreamError as e:
            self.outcome = {"unavailable": "upstream", "timeout": "timeout"}.get(e.reason, "upstream")
            raise upstream_api_error(e) from None
        if "error" in frame:
            self.outcome = "upstream" if frame_api_error(frame).status >= 500 else "validation"
            raise frame_api_error(frame)
        self._record(frame)
        return frame

    def _record(self, frame: dict) -> None:
        now = time.monotonic()
        text = frame.get("text", "")
        if text:
            if self._last_text_at is None:
                self.metrics.ttft.labels(model=self.model).observe(now - self.t0)
            else:
                per_token = (now - self._last_text_at) / len(text)
                self.metrics.itl.labels(model=self.model).observe(per_token)
            self._last_text_at = now
        if frame.get("finish_reason"):
            self.finish_reason = frame["finish_reason"]
            self.usage = frame.get("usage") or {}
            self.outcome = self.finish_reason
            self.metrics.prompt_tokens.labels(model=self.model).inc(self.usage.get("prompt_tokens", 0))
            self.metrics.generation_tokens.labels(model=self.model).inc(self.usage.get("completion_tokens", 0))

    async def close(self, route: str, disconnected: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        if disconnected and not self.finish_reason:
            self.outcome = "cancelled"
            self.metrics.cancelled.labels(model=self.model).inc()
        await self._frames.aclose()  # closes the upstream connection: TorchServe drops the job
        self.metrics.running.labels(model=self.model).dec()
        self.metrics.e2e.labels(model=self.model).observe(time.monotonic() - self.t0)
        self.metrics.requests.labels(model=self.model, route=route, outcome=self.outcome).inc()
        log.info("request %s on %s: %s in %.3fs", self.request_id, self.model, self.outcome,
                 time.monotonic() - self.t0)


async def first_frame(run: Run, route: str) -> dict:
    """Await the first frame; on failure close the run and let the error become the HTTP status."""
    try:
        frame = await run.next()
    except BaseException:
        await run.close(route)
        raise
    if frame is None:
        await run.close(route)
        raise APIError(502, "model server sent no frames", "upstream_error")
    return frame


async def collect(run: Run, route: str) -> tuple[str, str, dict]:
    """Whole text, finish reason and usage of a run (non-streaming answers)."""
    parts = []
    try:
        frame = await run.next()
        while frame is not None:
            parts.append(frame.get("text", ""))
            frame = await run.next()
    finally:
        await run.close(route)
    if run.finish_reason is None:
        raise APIError(502, "model server ended the stream early", "upstream_error")
    return "".join(parts), run.finish_reason, run.usage or {}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def sse_events(run: Run, route: str, first: dict, render: Callable[[dict], dict | None]) -> AsyncIterator[str]:
    """SSE body: one event per frame with text (rendered by the route), a final event, then [DONE].

    A client that goes away cancels this generator; closing the run then closes the upstream stream,
    so TorchServe drops the job and the handler frees its batch row at the next step.
    """
    disconnected = True
    try:
        frame: dict | None = first
        while frame is not None:
            event = render(frame)
            if event is not None:
                yield sse(event)
            try:
                frame = await run.next()
            except APIError as e:
                log.warning("request %s failed mid-stream: %s", run.request_id, e.message)
                yield sse(e.body())
                break
        yield sse("[DONE]")
        disconnected = False
    finally:
        await run.close(route, disconnected=disconnected)
