"""The benchmarks' load generators through the real gateway, TorchServe and handler: the gateway's lean client
(`bench lm`'s default) and aiohttp's read the same streams to their end."""
import asyncio

import pytest

from rnnserve.bench.baselines import http_lm

pytestmark = pytest.mark.e2e

CLIENTS, TOKENS = 4, 12


@pytest.mark.parametrize("client", ["lean", "aiohttp"])
@pytest.mark.parametrize("connect_first", [True, False])
def test_a_burst_of_streams_is_read_to_its_end(stack, client, connect_first):
    res = asyncio.run(http_lm(stack.url, "lm-shakespeare", "e2e", CLIENTS, TOKENS, connect_first, client))
    assert (res.errors, res.units, res.tokens) == (0, CLIENTS, CLIENTS * TOKENS)
    assert len(res.ttft) == CLIENTS and res.events >= 2 * CLIENTS  # a first frame and a last one per stream
    assert res.seconds > 0
