"""CPU placement of the stack's processes on a CPU machine (`frontend_cpus`, off by default).

On a small CPU machine the decode worker competes for cores with the gateway and TorchServe's
frontend (Java). For translation, whose worker decodes long steps and sends few frames, the
scheduler kept moving and preempting the worker's busy thread for the frontend's short bursts: on
the 2-core machine of BENCHMARKS.md the full stack made 0.76x its raw engine's translations/s at 32
clients, and 0.96x with the gateway and the frontend held to the first core and the workers free to
use every core. Streamed generation may be the other way round: its frontend handles an event per
token and stream, and two alternating measurements at 32 streams disagreed (0.96x left to the
scheduler against 0.75x held, then 0.74x against 0.86x). So the placement is asked for (`auto` or a
CPU list), not assumed.

`rnnserve serve` and `rnnserve torchserve` pin themselves to those CPUs (TorchServe's frontend,
started afterwards, inherits the mask) and hand the workers the whole set through
RNNSERVE_WORKER_CPUS, which the handlers apply at load. `auto` leaves a GPU machine alone.
"""
from __future__ import annotations

import logging
import math
import os

log = logging.getLogger(__name__)

WORKER_CPUS_ENV = "RNNSERVE_WORKER_CPUS"
CORES_PER_FRONTEND_CORE = 8  # auto: one frontend core per 8 cores (measured on 2 cores only)


def parse_cpus(spec: str) -> set[int]:
    """'0', '0,2', '0-3,6' -> a set of CPU numbers; ValueError on anything else."""
    cpus: set[int] = set()
    for part in spec.split(","):
        lo, dash, hi = part.strip().partition("-")
        if not lo.isdigit() or (dash and (not hi.isdigit() or int(hi) < int(lo))):
            raise ValueError(f"not a CPU list: {spec!r} (write e.g. 0 or 0,1 or 0-3)")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def format_cpus(cpus: set[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def frontend_cpus(spec: str, allowed: set[int], gpu: bool) -> set[int] | None:
    """The CPUs for the gateway and TorchServe's frontend, or None to leave placement to the scheduler.
    `auto`: on a CPU machine with two or more cores, the first ceil(n / 8) of them."""
    if spec == "none":
        return None
    if spec == "auto":
        if gpu or len(allowed) < 2:
            return None
        return set(sorted(allowed)[: math.ceil(len(allowed) / CORES_PER_FRONTEND_CORE)])
    cpus = parse_cpus(spec)
    if not cpus <= allowed or cpus == allowed:
        raise ValueError(f"frontend_cpus {spec!r} must be some, not all, of this process's CPUs "
                         f"{format_cpus(allowed)}")
    return cpus


def pin_frontend(spec: str) -> None:
    """Hold this process (and what it starts afterwards) to the frontend CPUs and tell the workers, through
    their inherited environment, to use every CPU this process could."""
    if not hasattr(os, "sched_setaffinity"):  # not on Linux
        return
    import torch  # the launcher has it already; only to ask whether a GPU serves

    allowed = os.sched_getaffinity(0)
    cpus = frontend_cpus(spec, allowed, torch.cuda.is_available())
    if cpus is None:
        return
    os.environ[WORKER_CPUS_ENV] = format_cpus(allowed)
    os.sched_setaffinity(0, cpus)
    log.info("gateway and TorchServe frontend on CPUs %s; workers on %s", format_cpus(cpus), format_cpus(allowed))


def free_worker() -> None:
    """In a worker: use every CPU the launcher could (it narrowed its own mask before starting TorchServe).
    Threads started afterwards (the engine's step thread, torch's pool) inherit the mask."""
    spec = os.environ.get(WORKER_CPUS_ENV)
    if spec and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, parse_cpus(spec))
        except (OSError, ValueError):
            log.warning("could not widen the worker to CPUs %s", spec, exc_info=True)
