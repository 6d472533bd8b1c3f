import sys
from types import SimpleNamespace

import pytest

from rnnserve.bench.loadtest import _loopback
from rnnserve.paths import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "load_tests"))
from arrivals import PoissonArrivals, parse_weights  # noqa: E402


def test_weights():
    assert parse_weights("stream=4, generate=1,") == {"stream": 4, "generate": 1}
    with pytest.raises(ValueError, match="name=integer"):
        parse_weights("stream=x")


def test_poisson_arrivals_keep_the_offered_rate_whatever_the_users():
    arrivals = PoissonArrivals(rate=50.0, seed=1, clock=lambda: 100.0)  # a frozen clock: no wall time involved
    users = [SimpleNamespace(environment=SimpleNamespace(runner=SimpleNamespace(user_count=10))) for _ in range(10)]
    gaps = [arrivals(u) for _ in range(400) for u in users]
    # each user's schedule advances by exponential gaps of mean users / rate = 0.2 s; together they
    # offer 50 requests/s. The schedule is cumulative, so compare the mean increment per call.
    per_user = [arrivals.next_at[id(u)] for u in users]
    assert len(gaps) == 4000 and min(gaps) >= 0
    mean_gap = (sum(per_user) / len(per_user) - 100.0) / 400
    assert 0.18 < mean_gap < 0.22


def test_loadtests_stay_on_loopback_by_default():
    assert _loopback("http://127.0.0.1:8000") and _loopback("http://localhost:8000") and _loopback("http://[::1]:80")
    assert not _loopback("http://10.0.0.5:8000") and not _loopback("https://example.com")


def test_soak_memory_growth_reads_through_a_garbage_collectors_saw_tooth():
    from rnnserve.bench.soak import memory_growth

    flat = [240.0, 230.0, 262.0, 236.0, 245.0, 240.0, 250.0, 236.0, 245.0, 240.0, 245.0, 230.0]
    warm = [{"t": i, "gateway": 100.0, "workers": 500.0 + i, "java": j} for i, j in enumerate(flat)]
    growth = memory_growth(warm)
    assert growth["gateway"] == 0.0
    assert growth["workers"] == round(100 * (510 - 501) / 501, 2)  # a steady rise is still seen
    assert growth["java"] == 0.0  # medians 240 and 240; single samples would say anything from -12% to +14%
    assert memory_growth(warm[:3]) == {}


def test_soak_steal_per_minute_divides_stolen_by_all_cpu_time_in_each_minute():
    from rnnserve.bench.soak import steal_per_minute

    # samples every 30 s; minute 0: 10 of 60 CPU-seconds stolen, minute 1: 30 of 60, minute 2: none
    samples = [{"t": 0.0, "cpu_s": 0.0, "steal_s": 0.0}, {"t": 30.0, "cpu_s": 60.0, "steal_s": 10.0},
               {"t": 60.0, "cpu_s": 90.0, "steal_s": 20.0}, {"t": 90.0, "cpu_s": 120.0, "steal_s": 40.0},
               {"t": 120.0, "cpu_s": 180.0, "steal_s": 40.0}]
    assert steal_per_minute(samples) == {0: round(100 * 10 / 60, 1), 1: 50.0, 2: 0.0}
    assert steal_per_minute(samples[:1]) == {}
