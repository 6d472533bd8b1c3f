"""The frame interval through the real stack, on the synthetic model (rnnserve/engine/synthetic.py): it grows with
the streams in flight, so a stream's text comes in a few big frames, and a stream with nothing to send is left out
of TorchServe's answers. (How far a call that brings new requests cuts the running step is tested on the handler,
tests/unit/test_lm_handler.py: through TorchServe, which call a new request joins depends on timing.)

The interval here is longer than the streams, so the frames are certain whatever the machine's speed: a stream's
first frame (its first token) goes out at once, and everything else with its last frame, however many calls and
new requests come between. The only time bound is the one that catches a hang.
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


def test_a_lone_streams_text_comes_in_two_frames_when_the_interval_grows_past_it(synthetic):
    async def go():
        async with await _session(synthetic.url) as session:
            return await _events(session, synthetic.url, 200)

    events = asyncio.run(go())
    assert [len(e["text"]) for e in events] == [1, 199]
    assert "".join(e["text"] for e in events) == _text(200)
    assert events[-1]["finish_reason"] == "length"


async def _frames(session: aiohttp.ClientSession, stack, tokens: int, log: list, name: str,
                  first: asyncio.Event | None = None) -> list[dict]:
    """TorchServe's own frames of one generation (its NDJSON, asked with its inference key, not the gateway's
    events, which skip empty texts); each frame's arrival is appended to `log`."""
    keys = json.loads((stack.run_dir / "key_file.json").read_text())
    url = f"{stack.ts_inference_url}/predictions/{SYNTHETIC}"
    frames = []
    async with session.post(url, json={"prompt": "ROMEO:", "max_tokens": tokens},
                            headers={"Authorization": f"Bearer {keys['inference']['key']}"}) as r:
        assert r.status == 200
        async for line in r.content:
            if line.strip():
                frames.append(json.loads(line))
                log.append((name, len(frames)))
                if first is not None:
                    first.set()
    return frames


def test_a_stream_gets_no_frame_from_the_calls_that_admit_others_and_never_an_empty_one(synthetic):
    """b joins while a runs (a: 2,000 tokens at 5 ms, 10 s; b: 50 tokens, sent once a's first frame is in): the
    calls that admit b and run b's steps cut a's steps, but a has nothing due and is left out of their answers.
    Every frame TorchServe sends carries text, but a last one that only holds the ending."""
    async def go():
        log: list = []
        async with await _session(synthetic.url) as session:
            first = asyncio.Event()
            a = asyncio.create_task(_frames(session, synthetic, 2000, log, "a", first))
            await first.wait()
            b = await _frames(session, synthetic, 50, log, "b")
            return await a, b, log

    a, b, log = asyncio.run(go())
    assert log.index(("b", len(b))) < log.index(("a", len(a)))  # b ran within a's stream
    assert [len(f["text"]) for f in a] == [1, 1999]
    assert [len(f["text"]) for f in b] == [1, 49]
    assert "".join(f["text"] for f in a) == _text(2000)
    assert a[-1]["finish_reason"] == b[-1]["finish_reason"] == "length"
