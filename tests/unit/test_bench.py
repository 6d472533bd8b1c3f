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


def test_http_lm_clients_connect_before_the_clock_and_stream_on_those_connections():
    """With connect_first every client opens its connection (a GET /healthz) before the burst, and each stream
    goes out on one of those connections; without it the streams open their own."""
    import asyncio

    from aiohttp import web

    from rnnserve.bench.baselines import http_lm

    async def run(connect_first: bool) -> tuple[list[tuple[int, str]], object]:
        seen: list[tuple[int, str]] = []  # (client port, path), in order

        async def health(request):
            seen.append((request.transport.get_extra_info("peername")[1], request.path))
            return web.json_response({"status": "ok"})

        async def generate(request):
            seen.append((request.transport.get_extra_info("peername")[1], request.path))
            assert (await request.json())["stream"] is True
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
            res = await http_lm(f"http://127.0.0.1:{port}", "m", "t", 4, 3, connect_first=connect_first)
        finally:
            await runner.cleanup()
        return seen, res

    seen, res = asyncio.run(run(True))
    assert res.tokens == 12 and res.units == 4 and res.errors == 0 and len(res.ttft) == 4
    assert [path for _, path in seen] == ["/healthz"] * 4 + ["/v1/generate"] * 4
    assert sorted(p for p, _ in seen[:4]) == sorted(p for p, _ in seen[4:])  # the same four connections
    seen, res = asyncio.run(run(False))
    assert res.tokens == 12 and [path for _, path in seen] == ["/v1/generate"] * 4
