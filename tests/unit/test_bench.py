from rnnserve.bench import Result, summarize


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
