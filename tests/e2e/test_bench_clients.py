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

    roles = stack.processes()
    assert len(roles["frontend"]) == 1 and roles["frontend"][0].name() == "java"
    assert len(roles["worker"]) >= 1 and roles["gateway"][0].pid == stack.proc.pid
    pid = jvm_pid(roles)
    assert pid == roles["frontend"][0].pid
    before = compiler_cpu_ms(pid)
    assert before > 0  # the JVM compiled its start-up paths
    bursts = []

    def burst():
        res = asyncio.run(http_lm(stack.url, "lm-shakespeare", "e2e", CLIENTS, TOKENS))
        bursts.append((res.errors, res.tokens))

    got = warm_until_compiled(burst, pid, min_bursts=2, max_bursts=4)
    assert 2 <= got["bursts"] <= 4 and bursts == [(0, CLIENTS * TOKENS)] * got["bursts"]
    assert all(ms >= 0 for ms in got["jit_ms_last_bursts"]) and len(got["jit_ms_last_bursts"]) == min(3, got["bursts"])


def test_bench_lm_without_the_naive_handlers_pairs_the_raw_engine_with_the_stack(tmp_path):
    """`bench lm --int8 --no-naive`: its own stack, warmed up; per run the raw engine and the full stack, in fp32 and
    in int8, each ratio against its own setup of the same run."""
    import json

    import torch

    from rnnserve.bench.baselines import bench_lm

    threads = torch.get_num_threads()
    try:
        rows = bench_lm([2], 8, tmp_path / "lm.json", worker_threads=1, repeat=2, int8=True, naive=False)
    finally:
        torch.set_num_threads(threads)  # the raw engine ran on the workers' thread count, in this process
    assert [r["name"] for r in rows] == ["raw engine", "full stack", "raw engine int8", "full stack int8"]
    assert all(r["errors"] == 0 and r["runs"] == 2 and r["clients"] == 2 for r in rows)
    assert rows[2]["vs_raw_int8"] == 1.0 and rows[1]["vs_stack_fp32"] == 1.0 and rows[0]["vs_raw"] == 1.0
    assert "vs_naive" not in rows[3] and rows[3]["vs_raw_int8"] > 0
    saved = json.loads((tmp_path / "lm.json").read_text())
    assert saved["naive"] is False and saved["warm_up"]["bursts"] >= 3
