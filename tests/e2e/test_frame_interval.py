"""The frame interval through the real stack, on the synthetic model (rnnserve/engine/synthetic.py): it grows with
the streams in flight, so a lone stream's text comes in a few big frames. (A call that brings new requests ending
the running interval is tested on the handler, tests/unit/test_lm_handler.py: through TorchServe, which call a new
request joins depends on timing.)

The interval here is longer than the stream, so the events are certain whatever the machine's speed: the stream's
first frame (its first token), the frame of the one engine step after the call that admitted it (all of the batch
was new), then everything else in its last frame. The only time bound is the one that catches a hang.
"""
import asyncio
import json

import aiohttp
import pytest

from rnnserve.bench.serving import SYNTHETIC, synthetic_models_dir
from rnnserve.engine.synthetic import PASSAGE
from rnnserve.service.stack import start_stack, stop_stack

pytestmark = pytest.mark.e2e

HANG_S = 300


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("frames")
    # 5 ms per token; the floor of 1 ms alone would send a frame per step, the growth (100 s per stream) makes the
    # interval longer than any stream here. The readiness probe (a request of its own) waits past the test.
    s = start_stack(tmp, models_dir=synthetic_models_dir(tmp, token_ms=5), extra_env={
        "RNNSERVE_FRAME_INTERVAL_MS": "1", "RNNSERVE_FRAME_INTERVAL_PER_STREAM_MS": "100000",
        "RNNSERVE_MAX_FRAME_INTERVAL_MS": "600000", "RNNSERVE_READY_PROBE_INTERVAL_S": "3600",
        "RNNSERVE_REQUEST_TIMEOUT_S": str(HANG_S)})
    yield s
    stop_stack(s)


def _text(n: int) -> str:
    return (PASSAGE * (1 + n // len(PASSAGE)))[:n]


async def _events(session: aiohttp.ClientSession, url: str, tokens: int) -> list:
    body = {"model": SYNTHETIC, "prompt": "ROMEO:", "max_tokens": tokens, "stream": True}
    events = []
    async with session.post(f"{url}/v1/generate", json=body) as r:
        assert r.status == 200
        async for line in r.content:
            if line.startswith(b"data: {"):
                events.append(json.loads(line[6:]))
    return events


async def _session(url: str):
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HANG_S))


def test_a_lone_streams_text_comes_in_three_frames_when_the_interval_grows_past_it(synthetic):
    async def go():
        async with await _session(synthetic.url) as session:
            return await _events(session, synthetic.url, 200)

    events = asyncio.run(go())
    assert [len(e["text"]) for e in events] == [1, 1, 198]
    assert "".join(e["text"] for e in events) == _text(200)
    assert events[-1]["finish_reason"] == "length"
