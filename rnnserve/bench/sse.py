"""Reading one streamed generation (SSE) the way every benchmark client does, and what it measured."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass
class StreamRead:
    events: int = 0
    ttft: float | None = None  # seconds from the request to the first text
    itl: list[float] = field(default_factory=list)  # seconds between texts, one entry per character
    completion_tokens: int = 0
    finished: bool = False  # an event with finish_reason arrived
    error: bool = False  # an error event arrived


async def read_stream(resp: aiohttp.ClientResponse, t0: float) -> StreamRead:
    """The events of a 200 answer: `data: {...}` lines, then a blank line each; `t0` is when it was sent."""
    out = StreamRead()
    last = None
    async for line in resp.content:
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        out.events += 1
        if "error" in event:
            out.error = True
            return out
        text = event.get("text", "")
        now = time.perf_counter()
        if text:
            if last is None:
                out.ttft = now - t0
            else:
                out.itl.extend([(now - last) / len(text)] * len(text))
            last = now
        if event.get("finish_reason"):
            out.completion_tokens = event["usage"]["completion_tokens"]
            out.finished = True
    return out
