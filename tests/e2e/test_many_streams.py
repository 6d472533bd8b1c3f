"""Over a thousand streams at once through the real stack, on the synthetic model (rnnserve/engine/synthetic.py):
with the gateway's admission raised past TorchServe's batch, TorchServe queues what its worker cannot hold yet,
and the gateway alone refuses (429 with Retry-After) what is over its bound. No stream may get a 5xx.

Nothing here depends on the machine's speed: the streams' text is deterministic, and the only time bound is
the one that catches a hang.
"""
import asyncio
import json

import aiohttp
import pytest

from rnnserve.bench.serving import SYNTHETIC, synthetic_models_dir
from rnnserve.engine.synthetic import PASSAGE
from rnnserve.service.stack import start_stack, stop_stack

pytestmark = pytest.mark.e2e

MAX_RUNNING = 1024
STREAMS = MAX_RUNNING + 64  # the last ones may find every slot taken (no waiting room): 429
TOKENS = 16
HANG_S = 600


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("many")
    s = start_stack(tmp, models_dir=synthetic_models_dir(tmp), extra_env={
        "RNNSERVE_MAX_RUNNING_PER_MODEL": str(MAX_RUNNING), "RNNSERVE_MAX_WAITING_PER_MODEL": "0",
        "RNNSERVE_REQUEST_TIMEOUT_S": str(HANG_S)})
    yield s
    stop_stack(s)


async def _one(session: aiohttp.ClientSession, url: str, i: int) -> tuple[int, object]:
    body = {"model": SYNTHETIC, "prompt": "ROMEO:", "max_tokens": TOKENS, "seed": i, "stream": True}
    async with session.post(f"{url}/v1/generate", json=body) as r:
        if r.status != 200:
            return r.status, (await r.json(), r.headers.get("Retry-After"))
        events = [json.loads(line[6:]) async for line in r.content if line.startswith(b"data: {")]
        return 200, events


async def _all(url: str) -> list[tuple[int, object]]:
    timeout = aiohttp.ClientTimeout(total=HANG_S)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        return await asyncio.gather(*(_one(session, url, i) for i in range(STREAMS)))


def test_over_a_thousand_streams_at_once_complete_or_get_the_gateways_429(many):
    results = asyncio.run(_all(many.url))
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    # a request is refused only while MAX_RUNNING others run, and every one of those completes
    assert statuses.count(200) >= MAX_RUNNING
    for i, (status, got) in enumerate(results):
        if status == 429:
            body, retry_after = got
            assert body == {"error": {"message": f"model {SYNTHETIC!r} is at capacity; retry in 1s",
                                      "type": "overloaded_error", "param": None, "code": 429}}
            assert retry_after == "1"
            continue
        assert all("error" not in e for e in got), got[-1]
        assert "".join(e.get("text", "") for e in got) == (PASSAGE * 2)[i % len(PASSAGE):][:TOKENS]
        assert got[-1]["finish_reason"] == "length"
        assert got[-1]["usage"]["completion_tokens"] == TOKENS
