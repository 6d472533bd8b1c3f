"""Open-loop arrivals for locust and the weights parser (no locust import: unit-testable)."""
from __future__ import annotations

import random
import time
from typing import Callable


class PoissonArrivals:
    """wait_time for open-loop load: arrivals of a Poisson process of `rate` requests/s in total.

    Each user follows its own schedule of exponential gaps at rate / users; its next arrival time
    does not move when a response is slow (it only waits less), so the offered load stays at `rate`
    as long as there are enough users for the requests in flight (give more users than
    rate x latency).
    """

    def __init__(self, rate: float, seed: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.rng = random.Random(seed)
        self.clock = clock
        self.next_at: dict[int, float] = {}

    def __call__(self, user) -> float:
        users = max(1, user.environment.runner.user_count if user.environment.runner else 1)
        now = self.clock()
        due = max(now, self.next_at.get(id(user), now)) + self.rng.expovariate(self.rate / users)
        self.next_at[id(user)] = due
        return max(0.0, due - now)


def parse_weights(text: str) -> dict[str, int]:
    """"stream=4,generate=1" -> {"stream": 4, "generate": 1}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if not value.isdigit():
            raise ValueError(f"weight {part!r}: expected name=integer")
        out[name.strip()] = int(value)
    return out
