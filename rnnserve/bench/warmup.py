"""Warming a stack up until TorchServe's JVM has compiled its hot paths.

The frontend's JIT compiles a method after it ran a few hundred times, so a stack measured too early relays its
frames through code still being compiled, beside the engine on the same cores: on the 2-core CPU machine the
compiler threads took ~7 ms of CPU per 32-stream burst after three warm-up bursts, and the frontend's CPU per burst
halved once they settled, after 20-30 bursts (BENCHMARKS.md). A service relays millions of frames; the benchmarks
measure that steady state. The compilers' CPU is read from Linux's per-thread counters (nanoseconds).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

SETTLED_MS = 1.0  # the compilers spent less than this in each of the last SETTLED_BURSTS bursts
SETTLED_BURSTS = 3
MAX_BURSTS = 60


def jvm_pid(roles: dict[str, list[psutil.Process]]) -> int | None:
    """The pid of TorchServe's frontend (its JVM) among a stack's processes (Stack.processes), or None."""
    return roles["frontend"][0].pid if roles.get("frontend") else None


def compiler_cpu_ms(pid: int) -> float | None:
    """CPU time of the JVM's compiler threads ("C1 CompilerThre", "C2 CompilerThre"), or None where unreadable."""
    total, seen = 0, False
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            if "CompilerThre" not in (task / "comm").read_text():
                continue
            total += int((task / "schedstat").read_text().split()[0])
            seen = True
        except (OSError, ValueError, IndexError):  # a thread that ended meanwhile, or no schedstat
            continue
    if not seen and not Path(f"/proc/{pid}/task").is_dir():
        return None
    return total / 1e6


def warm_until_compiled(burst: Callable[[], object], jvm_pid: int | None, min_bursts: int = 3,
                        max_bursts: int = MAX_BURSTS) -> dict:
    """Run `burst` at least `min_bursts` times, then until the JVM's compilers spent under SETTLED_MS in each of
    SETTLED_BURSTS bursts in a row, at most `max_bursts` times -> what it took. Without the JVM's counters (not
    Linux, or no pid) it runs `min_bursts` and reports `jit_settled` as None (unknown). A compiler thread that
    ends takes its counter with it, so a burst whose total fell counts as settled."""
    last = compiler_cpu_ms(jvm_pid) if jvm_pid else None
    quiet, spent, n = 0, [], 0
    while n < max_bursts:
        burst()
        n += 1
        if last is None:
            if n >= min_bursts:
                break
            continue
        now = compiler_cpu_ms(jvm_pid)
        spent.append(round(max(0.0, now - last), 2) if now is not None else 0.0)
        last = now
        quiet = quiet + 1 if spent[-1] < SETTLED_MS else 0
        if n >= min_bursts and quiet >= SETTLED_BURSTS:
            break
    settled = None if last is None else quiet >= SETTLED_BURSTS  # None: no counters to tell
    log.info("warm-up: %d bursts, the JVM's compilers %s (ms per burst, last ones: %s)", n,
             {None: "unobserved", True: "settled", False: "still busy"}[settled], spent[-5:])
    return {"bursts": n, "jit_settled": settled, "jit_ms_last_bursts": spent[-SETTLED_BURSTS:]}
