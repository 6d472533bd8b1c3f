"""Bounded admission per model, by count and by cost: at most `max_running` upstream requests in flight
(the handler's batch rows), at most `max_cost` tokens in flight (what they read, score and decode:
service/gateway/cost.py), and `max_waiting` requests queued; anything beyond is refused at once with 429
and Retry-After, so overload never turns into unbounded queues or latency. A request that costs more
than `max_cost` alone could never run: 400. Health and metrics routes never pass through here.

With several gateway processes (RNNSERVE_GATEWAY_WORKERS), `SharedAdmission` keeps the same bounds for the
whole service through counters every process shares (slots.py)."""
from __future__ import annotations

import asyncio
import time
from collections import deque

from rnnserve.service.gateway.errors import APIError
from rnnserve.service.gateway.metrics import Metrics
from rnnserve.service.gateway.slots import COST, RUNNING, WAITING, SharedCounts

RETRY_AFTER_S = 1
# how often the head of a process's queue looks for a slot another process freed (a slot freed in the
# same process wakes it at once)
POLL_S = 0.01


class Admission:
    def __init__(self, model: str, max_running: int, max_waiting: int, metrics: Metrics,
                 max_cost: int | None = None) -> None:
        self.model, self.max_running, self.max_waiting = model, max_running, max_waiting
        self.max_cost = max_cost  # None: requests count, their cost does not
        self.metrics = metrics
        self._m = metrics.stream(model)  # the model's metric children, looked up once
        self._shown: tuple[int, int] | None = None  # the gauges' values: set only when they change
        self.running = 0
        self.cost = 0  # tokens in flight
        self._waiters: deque[tuple[int, int, asyncio.Future]] = deque()
        self._waiting_units = 0

    def _set_gauges(self) -> None:
        self._show(self.running, self._waiting_units)

    def _show(self, running: int, waiting: int) -> None:
        shown = self._shown
        if shown is None or shown[0] != running:
            self._m.running.set(running)
        if shown is None or shown[1] != waiting:
            self._m.waiting.set(waiting)
        self._shown = (running, waiting)

    def _fits(self, units: int, cost: int) -> bool:
        return (self.running + units <= self.max_running
                and (self.max_cost is None or self.cost + cost <= self.max_cost))

    async def acquire(self, units: int = 1, timeout_s: float | None = None, cost: int = 0) -> float:
        """Take `units` slots (one per upstream request) and `cost` tokens; returns the seconds spent queued."""
        t0 = time.monotonic()
        self._check(units, cost)
        if not self._waiters and self._fits(units, cost):
            self.running += units
            self.cost += cost
            self._set_gauges()
            self._m.queue_time.observe(0.0)
            return 0.0
        if self._waiting_units + units > self.max_waiting:
            raise self.overloaded()
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
        self._m.queue_time.observe(waited)
        return waited

    def _check(self, units: int, cost: int) -> None:
        """A request that could never run, however long it waited: 400."""
        if units > self.max_running:
            raise APIError(400, f"this request needs {units} concurrent generations; the limit is "
                                f"{self.max_running}", "invalid_request_error")
        if self.max_cost is not None and cost > self.max_cost:
            raise APIError(400, f"this request costs {cost:,} tokens (the characters it sends and the tokens it asks "
                                f"for); model {self.model!r} runs at most {self.max_cost:,} at once: send fewer or "
                                "shorter texts, or a lower max_tokens", "invalid_request_error")

    def overloaded(self) -> APIError:
        return APIError(429, f"model {self.model!r} is at capacity; retry in {RETRY_AFTER_S}s",
                        "overloaded_error", headers={"Retry-After": str(RETRY_AFTER_S)})

    def release(self, units: int = 1, cost: int = 0) -> None:
        self.running -= units
        self.cost -= cost
        self._grant()  # sets the gauges

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
        self._set_gauges()


class SharedAdmission(Admission):
    """The same bounds over every gateway process of the service. Each process queues its own waiters first
    come, first served; the head of the queue takes a slot as soon as the service-wide count allows, woken by
    a release in its own process or, for one in another process, within POLL_S. A new request runs at once
    only while nobody anywhere waits."""

    def __init__(self, model: str, max_running: int, max_waiting: int, metrics: Metrics, counts: SharedCounts,
                 max_cost: int | None = None) -> None:
        super().__init__(model, max_running, max_waiting, metrics, max_cost)
        self.counts = counts
        self._local: deque[tuple[int, object]] = deque()
        self._wake = asyncio.Event()

    def _set_gauges(self) -> None:
        # this process's share: the multiprocess collector sums the live processes' (metrics.py)
        self._show(self.counts.own(self.model, RUNNING), self.counts.own(self.model, WAITING))

    def _take(self, units: int, cost: int, queued: bool) -> bool:
        """Move `units` and `cost` to running when the service has room (from this process's waiting when `queued`).
        A request that has not queued never overtakes one waiting anywhere."""
        c, m = self.counts, self.model

        def fits() -> bool:
            if not queued and c.total(m, WAITING) > 0:
                return False
            return (c.total(m, RUNNING) + units <= self.max_running
                    and (self.max_cost is None or c.total(m, COST) + cost <= self.max_cost))

        with c.locked():
            if not fits() and not (c.reclaim_dead() and fits()):
                return False
            c.add(m, RUNNING, units)
            c.add(m, COST, cost)
            if queued:
                c.add(m, WAITING, -units)
        return True

    async def acquire(self, units: int = 1, timeout_s: float | None = None, cost: int = 0) -> float:
        t0 = time.monotonic()
        self._check(units, cost)
        if not self._local and self._take(units, cost, queued=False):
            self._set_gauges()
            self._m.queue_time.observe(0.0)
            return 0.0
        c, m = self.counts, self.model
        with c.locked():
            def room() -> bool:
                return c.total(m, WAITING) + units <= self.max_waiting

            if not room() and not (c.reclaim_dead() and room()):
                raise self.overloaded()
            c.add(m, WAITING, units)
        entry = (units, object())
        self._local.append(entry)
        self._set_gauges()
        try:
            async with asyncio.timeout(timeout_s):
                while not (self._local[0] is entry and self._take(units, cost, queued=True)):
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), POLL_S)
                    except TimeoutError:
                        pass
        except BaseException:
            with c.locked():
                c.add(m, WAITING, -units)
            raise
        finally:
            self._local.remove(entry)
            self._wake.set()  # the next in line looks at once
            self._set_gauges()
        waited = time.monotonic() - t0
        self._m.queue_time.observe(waited)
        return waited

    def release(self, units: int = 1, cost: int = 0) -> None:
        with self.counts.locked():
            self.counts.add(self.model, RUNNING, -units)
            self.counts.add(self.model, COST, -cost)
        self._wake.set()
        self._set_gauges()
