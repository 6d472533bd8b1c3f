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


def test_the_warm_up_reads_the_frontends_compiler_threads(stack):
    """The benchmarks' warm-up finds TorchServe's JVM and its compilers' CPU time, which only grows, and runs
    real bursts until they settle or its bound is reached."""
    from rnnserve.bench.warmup import compiler_cpu_ms, jvm_pid, warm_until_compiled

    pid = jvm_pid(stack)
    assert pid is not None
    before = compiler_cpu_ms(pid)
    assert before > 0  # the JVM compiled its start-up paths
    bursts = []

    def burst():
        res = asyncio.run(http_lm(stack.url, "lm-shakespeare", "e2e", CLIENTS, TOKENS))
        bursts.append((res.errors, res.tokens))

    got = warm_until_compiled(burst, pid, min_bursts=2, max_bursts=4)
    assert 2 <= got["bursts"] <= 4 and bursts == [(0, CLIENTS * TOKENS)] * got["bursts"]
    assert all(ms >= 0 for ms in got["jit_ms_last_bursts"]) and len(got["jit_ms_last_bursts"]) == min(3, got["bursts"])
