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
