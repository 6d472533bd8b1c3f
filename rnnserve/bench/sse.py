"""How every benchmark client runs (`run_client`: its event loop) and reads one streamed generation (SSE)."""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp

from rnnserve.service.gateway.torchserve_client import Response

try:
    import uvloop
except ImportError:  # not built for this platform (Windows): asyncio's own loop
    uvloop = None

T = TypeVar("T")


def run_client(main: Coroutine[Any, Any, T]) -> T:
    """Run a benchmark's clients (`asyncio.run`) on uvloop, the gateway's own event loop. The clients share the
    cores with the stack, and what they spend comes out of the stack's figures: on asyncio's loop they took about
    1.2x the CPU per burst, and the stack made 1-6% fewer tokens/s at 32 streams (BENCHMARKS.md)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop if uvloop else None) as runner:
        return runner.run(main)


@dataclass
class StreamRead:
    events: int = 0
    ttft: float | None = None  # seconds from the request to the first text
    itl: list[float] = field(default_factory=list)  # seconds between texts, one entry per character
    completion_tokens: int = 0
    finished: bool = False  # an event with finish_reason arrived
    error: bool = False  # an error event arrived
    last_text_at: float | None = field(default=None, repr=False)

    def take(self, line: bytes, t0: float) -> bool:
        """One line of the body (`t0`: when the request was sent): a `data: {...}` line is an event, any other
        (a blank line, `data: [DONE]`) is skipped. False once an error event ends the stream."""
        if not line.startswith(b"data: {"):
            return True
        event = json.loads(line[6:])
        self.events += 1
        if "error" in event:
            self.error = True
            return False
        text = event.get("text", "")
        now = time.perf_counter()
        if text:
            if self.last_text_at is None:
                self.ttft = now - t0
            else:
                self.itl.extend([(now - self.last_text_at) / len(text)] * len(text))
            self.last_text_at = now
        if event.get("finish_reason"):
            self.completion_tokens = event["usage"]["completion_tokens"]
            self.finished = True
        return True


async def read_stream(resp: aiohttp.ClientResponse, t0: float) -> StreamRead:
    """The events of a 200 answer read with aiohttp: `data: {...}` lines, then a blank line each."""
    out = StreamRead()
    async for line in resp.content:
        if not out.take(line, t0):
            break
    return out


async def read_stream_lines(resp: Response, t0: float) -> StreamRead:
    """The same, read with the lean client (service/gateway/torchserve_client.py), which gives the body's lines."""
    out = StreamRead()
    while (line := await resp.readline()) is not None:
        if not out.take(line, t0):
            break
    return out
