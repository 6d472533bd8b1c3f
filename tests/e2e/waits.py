"""Waiting on states, never on durations: the machines that run the suite swing 3x in speed.

`PACED` makes an LM stack's streams slow on purpose and on any machine: one token per engine step, at
least 20 ms per step and one frame per step (no frame interval gathering several steps), so a 2,048-token
stream needs over 40 s however fast the CPU decodes.
"""
from __future__ import annotations

import time
from typing import Callable

import httpx

PACED = {"RNNSERVE_MAX_TOKENS_PER_STEP": "1", "RNNSERVE_MIN_STEP_MS": "20", "RNNSERVE_FRAME_INTERVAL_MS": "0"}
HANG_S = 60.0  # a bound that only a hang reaches


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = HANG_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout:.0f}s for {what}")
        time.sleep(0.05)


def metric(client: httpx.Client, name: str, headers: dict | None = None, **labels) -> float:
    """A gateway metric's value, from its /metrics."""
    text = client.get("/metrics", headers=headers or {}).text
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    raise AssertionError(f"{name}{{{want}}} not exported")
