"""The benchmarks' warm-up: bursts until the JVM's compilers have settled (rnnserve/bench/warmup.py)."""
import os
import subprocess

from rnnserve.bench import warmup


def _counter(monkeypatch, totals):
    """compiler_cpu_ms returns these running totals in turn (the first before any burst)."""
    it = iter(totals)
    monkeypatch.setattr(warmup, "compiler_cpu_ms", lambda pid: next(it))


def test_bursts_until_three_quiet_bursts_in_a_row(monkeypatch):
    # per burst: 40, 30, 0.5 (quiet), 6 (busy again), 0.2, 0.9, 0.1 -> settled after 7 bursts
    _counter(monkeypatch, [100, 140, 170, 170.5, 176.5, 176.7, 177.6, 177.7, 999])
    bursts = []
    got = warmup.warm_until_compiled(lambda: bursts.append(1), jvm_pid=123, min_bursts=3)
    assert got == {"bursts": 7, "jit_settled": True, "jit_ms_last_bursts": [0.2, 0.9, 0.1]}
    assert len(bursts) == 7


def test_at_least_min_bursts_even_when_quiet_from_the_start(monkeypatch):
    _counter(monkeypatch, [50.0] * 10)
    got = warmup.warm_until_compiled(lambda: None, jvm_pid=123, min_bursts=5)
    assert got == {"bursts": 5, "jit_settled": True, "jit_ms_last_bursts": [0.0, 0.0, 0.0]}


def test_stops_at_max_bursts_and_says_the_compilers_were_still_busy(monkeypatch):
    _counter(monkeypatch, [10.0 * i for i in range(20)])
    got = warmup.warm_until_compiled(lambda: None, jvm_pid=123, min_bursts=3, max_bursts=6)
    assert got == {"bursts": 6, "jit_settled": False, "jit_ms_last_bursts": [10.0, 10.0, 10.0]}


def test_a_compiler_thread_that_ended_counts_as_a_quiet_burst(monkeypatch):
    _counter(monkeypatch, [300, 310, 90, 90.1, 90.2])  # the total fell: a thread and its counter are gone
    got = warmup.warm_until_compiled(lambda: None, jvm_pid=123, min_bursts=1)
    assert got == {"bursts": 4, "jit_settled": True, "jit_ms_last_bursts": [0.0, 0.1, 0.1]}


def test_without_the_jvms_counters_it_runs_min_bursts_and_cannot_tell():
    bursts = []
    got = warmup.warm_until_compiled(lambda: bursts.append(1), jvm_pid=None, min_bursts=4)
    assert got == {"bursts": 4, "jit_settled": None, "jit_ms_last_bursts": []}
    assert len(bursts) == 4


def test_jvm_pid_is_the_frontends():
    class P:
        pid = 42
    assert warmup.jvm_pid({"gateway": [], "frontend": [P()], "worker": []}) == 42
    assert warmup.jvm_pid({"gateway": [], "frontend": [], "worker": []}) is None


def test_compiler_cpu_ms_reads_only_compiler_threads():
    assert warmup.compiler_cpu_ms(os.getpid()) == 0.0  # Python has no thread of that name
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert warmup.compiler_cpu_ms(dead.pid) is None


def test_the_command_lines_bound_on_warm_up_bursts_is_the_warm_ups_own():
    # cli.py spells the default out (building the parser must not import the benchmarks, hence torch)
    from rnnserve.cli import build_parser
    args = build_parser().parse_args(["bench", "lm"])
    assert args.max_warm_up_bursts == warmup.MAX_BURSTS
