"""Bounded admission per model, by count and by cost: at most `max_running` upstream requests in flight
(the handler's batch rows), at most `max_cost` tokens in flight (what they read, score and decode:
service/gateway/cost.py), and `max_waiting` requests queued; anything beyond is refused at once with 429
and Retry-After, so overload never turns into unbounded queues or latency. A request that costs more
than `max_cost` alone could never run: 400. Health and metrics routes never pass through here."""
from __future__ import annotations

import asyncio
import time
from collections import deque

from rnnserve.service.gateway.errors import APIError
from rnnserve.service.gateway.metrics import Metrics

RETRY_AFTER_S = 1


class Admission:
    def __init__(self, model: str, max_running: int, max_waiting: int, metrics: Metrics,
                 max_cost: int | None = None) -> None:
        self.model, self.max_running, self.max_waiting = model, max_running, max_waiting
        self.max_cost = max_cost  # None: requests count, their cost does not
        self.metrics = metrics
        self.running = 0
        self.cost = 0  # tokens in flight
        self._waiters: deque[tuple[int, int, asyncio.Future]] = deque()
        self._waiting_units = 0

    def _set_gauges(self) -> None:
        self.metrics.running.labels(model=self.model).set(self.running)
        self.metrics.waiting.labels(model=self.model).set(self._waiting_units)

    def _fits(self, units: int, cost: int) -> bool:
        return (self.running + units <= self.max_running
                and (self.max_cost is None or self.cost + cost <= self.max_cost))

    async def acquire(self, units: int = 1, timeout_s: float | None = None, cost: int = 0) -> float:
        """Take `units` slots (one per upstream request) and `cost` tokens; returns the seconds spent queued."""
        t0 = time.monotonic()
        if units > self.max_running:
            raise APIError(400, f"this request needs {units} concurrent generations; the limit is "
                                f"{self.max_running}", "invalid_request_error")
        if self.max_cost is not None and cost > self.max_cost:
            raise APIError(400, f"this request costs {cost:,} tokens (the characters it sends and the tokens it asks "
                                f"for); model {self.model!r} runs at most {self.max_cost:,} at once: send fewer or "
                                "shorter texts, or a lower max_tokens", "invalid_request_error")
        if not self._waiters and self._fits(units, cost):
            self.running += units
            self.cost += cost
            self._set_gauges()
            self.metrics.queue_time.labels(model=self.model).observe(0.0)
            return 0.0
        if self._waiting_units + units > self.max_waiting:
            raise APIError(429, f"model {self.model!r} is at capacity; retry in {RETRY_AFTER_S}s",
                           "overloaded_error", code="overloaded", headers={"Retry-After": str(RETRY_AFTER_S)})
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        entry = (units, cost, fut)
        self._waiters.append(entry)
        self._waiting_units += units
        self._set_gauges()
        try:
            async with asyncio.timeout(timeout_s):
                await fut
        except BaseException:
            if entry in self._waiters:
                self._waiters.remove(entry)
                self._waiting_units -= units
                self._grant()  # a large request leaving the head may let smaller ones behind it in
            elif fut.done() and not fut.cancelled():
                self.release(units, cost)  # granted just as we gave up: hand the slots on
            self._set_gauges()
            raise
        waited = time.monotonic() - t0
        self.metrics.queue_time.labels(model=self.model).observe(waited)
        return waited

    def release(self, units: int = 1, cost: int = 0) -> None:
        self.running -= units
        self.cost -= cost
        self._grant()
        self._set_gauges()

    def _grant(self) -> None:
        # first come, first served: a large request at the head is not overtaken
        while self._waiters and self._fits(self._waiters[0][0], self._waiters[0][1]):
            units_w, cost_w, fut = self._waiters.popleft()
            self._waiting_units -= units_w
            if fut.cancelled():
                continue
            self.running += units_w
            self.cost += cost_w
            fut.set_result(None)
