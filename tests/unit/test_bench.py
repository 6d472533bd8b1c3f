import pytest

from rnnserve.bench.baselines import Result, summarize


def test_summary_takes_medians_and_the_median_of_per_run_ratios(capsys):
    def run(raw_tps, full_tps, ttft):
        raw, full = Result("raw engine", 4, tokens=int(raw_tps), seconds=1.0), Result("full stack", 4,
                                                                                      tokens=int(full_tps), seconds=1.0)
        full.ttft = [ttft]
        return [raw, full]

    rows = summarize([run(1000, 800, 0.1), run(500, 450, 0.3), run(2000, 1000, 0.2)], "tokens_per_s", {"vs_raw": 0})
    raw, full = rows
    assert (raw["tokens_per_s"], full["tokens_per_s"]) == (1000.0, 800.0)
    assert full["ttft_p99_ms"] == 200.0 and raw["ttft_p99_ms"] is None
    assert full["vs_raw"] == 0.8  # per-run ratios 0.8, 0.9, 0.5: their median, not 800 / 1000 by chance
    assert full["vs_raw_per_run"] == [0.8, 0.9, 0.5] and raw["vs_raw_per_run"] == [1.0, 1.0, 1.0]
    assert raw["vs_raw"] == 1.0 and full["runs"] == 3
    assert "| full stack | 4 | 800.0 | 200.0 | 200.0 | - | - | 0.8 | 0 |" in capsys.readouterr().out


def test_measured_records_the_share_of_cpu_time_stolen_during_the_run(monkeypatch):
    from collections import namedtuple

    import rnnserve.bench.baselines as bench

    Times = namedtuple("Times", "user system idle steal")
    ticks = iter([Times(100.0, 10.0, 50.0, 40.0), Times(130.0, 20.0, 60.0, 70.0)])  # +80 s of CPU, 30 of them stolen
    monkeypatch.setattr(bench.psutil, "cpu_times", lambda: next(ticks))
    res = bench.measured(lambda: Result("raw engine", 1, tokens=10, seconds=1.0))
    assert res.steal_pct == 37.5  # 30 / 80
    assert res.row()["steal_pct"] == 37.5


def test_bench_lm_int8_serves_a_second_copy_of_the_model_with_the_int8_step(tmp_path):
    import json

    from rnnserve.bench.baselines import INT8_LM, _bench_models_dir
    from rnnserve.service.archive import model_config

    models = _bench_models_dir(tmp_path, ["lm-shakespeare"], naive=False, int8=True)
    assert sorted(p.name for p in models.iterdir()) == ["lm-shakespeare", INT8_LM]
    fp32, int8 = (json.loads((models / n / "config.json").read_text()) for n in ("lm-shakespeare", INT8_LM))
    assert int8 == {**fp32, "int8": True, "name": INT8_LM} and fp32["int8"] is False  # served beside it
    assert model_config("lm", int8)["handler"]["int8"] is True
    assert model_config("lm", fp32)["handler"]["int8"] is False


def test_bench_lm_gpu_refuses_without_a_gpu_and_with_int8(monkeypatch, tmp_path):
    import torch

    from rnnserve.bench.baselines import bench_lm

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU, and torch sees none"):
        bench_lm([256], 16, tmp_path / "out.json", gpu=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit, match="--int8 is the CPU's comparison"):
        bench_lm([256], 16, tmp_path / "out.json", gpu=True, int8=True, naive=False)
    with pytest.raises(SystemExit, match="--gpu needs --no-naive"):
        bench_lm([256], 16, tmp_path / "out.json", gpu=True)
    assert not (tmp_path / "out.json").exists()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_the_gpu_raw_engine_is_built_as_the_gpu_profiles_worker_builds_it():
    import torch

    from rnnserve.bench.baselines import gpu_engine, raw_lm

    engine = gpu_engine()
    assert engine.max_batch_size == 1024 and engine.device.type == "cuda"
    assert next(engine.model.parameters()).dtype == torch.float16
    res = raw_lm(engine, 8, 16, 60.0)
    assert res.tokens == 8 * 16 and len(res.ttft) == 8


@pytest.mark.parametrize("client", ["lean", "aiohttp"])
def test_http_lm_clients_connect_before_the_clock_and_stream_on_those_connections(client):
    """With connect_first every client's connection is open before the burst (aiohttp's by a GET /healthz, the lean
    client's by connecting), and each stream goes out on one of those connections; without it the streams open
    their own. Either client reads the same events."""
    import asyncio

    from aiohttp import web

    from rnnserve.bench.baselines import http_lm

    async def run(connect_first: bool) -> tuple[list[tuple[int, str]], object, list[int]]:
        seen: list[tuple[int, str]] = []  # (client port, path), in order
        open_at_first: list[int] = []  # connections open when the first stream arrived

        async def health(request):
            seen.append((request.transport.get_extra_info("peername")[1], request.path))
            return web.json_response({"status": "ok"})

        async def generate(request):
            seen.append((request.transport.get_extra_info("peername")[1], request.path))
            if not open_at_first:
                open_at_first.append(len(runner.server.connections))
            assert request.content_type == "application/json" and (await request.json())["stream"] is True
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b'data: {"text": "ab"}\n\n')
            await resp.write(b'data: {"text": "c", "finish_reason": "length", "usage": {"completion_tokens": 3}}\n\n')
            await resp.write(b"data: [DONE]\n\n")
            return resp

        app = web.Application()
        app.router.add_get("/healthz", health)
        app.router.add_post("/v1/generate", generate)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            res = await http_lm(f"http://127.0.0.1:{port}", "m", "t", 4, 3, connect_first=connect_first,
                                client=client)
        finally:
            await runner.cleanup()
        return seen, res, open_at_first

    seen, res, open_at_first = asyncio.run(run(True))
    assert res.tokens == 12 and res.units == 4 and res.errors == 0 and res.events == 8 and len(res.ttft) == 4
    assert open_at_first == [4]
    streams = [p for p, path in seen if path == "/v1/generate"]
    assert len(set(streams)) == 4
    if client == "aiohttp":
        assert [path for _, path in seen] == ["/healthz"] * 4 + ["/v1/generate"] * 4
        assert sorted(p for p, _ in seen[:4]) == sorted(streams)  # the same four connections
    else:
        assert [path for _, path in seen] == ["/v1/generate"] * 4
    seen, res, _ = asyncio.run(run(False))
    assert res.tokens == 12 and [path for _, path in seen] == ["/v1/generate"] * 4


def test_a_stream_read_counts_events_texts_and_the_end_and_stops_at_an_error():
    from rnnserve.bench.sse import StreamRead

    got = StreamRead()
    last = b'data: {"text": "c", "finish_reason": "length", "usage": {"completion_tokens": 3}}\n'
    lines = [b'data: {"text": "ab"}', b"", b'data: {"text": ""}', last, b"data: [DONE]"]
    assert all(got.take(line, t0=0.0) for line in lines)
    assert (got.events, got.completion_tokens, got.finished, got.error) == (3, 3, True, False)
    assert got.ttft is not None and len(got.itl) == 1  # one entry per character after the first text
    bad = StreamRead()
    assert bad.take(b'data: {"error": {"message": "overloaded"}}', t0=0.0) is False
    assert (bad.events, bad.error, bad.finished) == (1, True, False)
