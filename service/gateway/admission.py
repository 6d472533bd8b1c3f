"""Bounded admission per model: at most `max_running` upstream requests in flight and `max_waiting`
queued; anything beyond is refused at once with 429 and Retry-After, so overload never turns into
unbounded queues or latency. Health and metrics routes never pass through here."""
from __future__ import annotations

import asyncio
import time
from collections import deque

from rnnserve.service.gateway.errors import APIError
from rnnserve.service.gateway.metrics import Metrics

RETRY_AFTER_S = 1


class Admission:
    def __init__(self, model: str, max_running: int, max_waiting: int, metrics: Metrics) -> None:
        self.model, self.max_running, self.max_waiting = model, max_running, max_waiting
        self.metrics = metrics
        self.running = 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()
        self._waiting_units = 0

    def _set_gauges(self) -> None:
        self.metrics.running.labels(model=self.model).set(self.running)
        self.metrics.waiting.labels(model=self.model).set(self._waiting_units)

    async def acquire(self, units: int = 1, timeout_s: float | None = None) -> float:
        """Take `units` slots (one per upstream request); returns the seconds spent queued."""
        t0 = time.monotonic()
        if units > self.max_running:
            raise APIError(400, f"this request needs {units} concurrent generations; the limit is "
                                f"{self.max_running}", "invalid_request_error")
        if not self._waiters and self.running + units <= self.max_running:
            self.running += units
            self._set_gauges()
            self.metrics.queue_time.labels(model=self.model).observe(0.0)
            return 0.0
        if self._waiting_units + units > self.max_waiting:
            raise APIError(429, f"model {self.model!r} is at capacity; retry in {RETRY_AFTER_S}s",
                           "overloaded_error", headers={"Retry-After": str(RETRY_AFTER_S)})
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        entry = (units, fut)
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
            elif fut.done() and not fut.cancelled():
                self.release(units)  # granted just as we gave up: hand the slots on
            self._set_gauges()
            raise
        waited = time.monotonic() - t0
        self.metrics.queue_time.labels(model=self.model).observe(waited)
        return waited

    def release(self, units: int = 1) -> None:
        self.running -= units
        # first come, first served: a large request at the head is not overtaken
        while self._waiters and self.running + self._waiters[0][0] <= self.max_running:
            units_w, fut = self._waiters.popleft()
            self._waiting_units -= units_w
            if fut.cancelled():
                continue
            self.running += units_w
            fut.set_result(None)
        self._set_gauges()
