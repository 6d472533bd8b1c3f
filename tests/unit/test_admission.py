"""Admission by count and by cost (service/gateway/admission.py), with the real asyncio queue."""
import asyncio

import pytest

from rnnserve.service.gateway.admission import Admission
from rnnserve.service.gateway.errors import APIError
from rnnserve.service.gateway.metrics import Metrics


def admission(**kw) -> Admission:
    metrics = Metrics()
    metrics.init_model("m")
    return Admission("m", kw.pop("max_running", 8), kw.pop("max_waiting", 8), metrics, **kw)


def test_requests_wait_for_cost_not_only_for_slots():
    async def main():
        a = admission(max_cost=100)
        await a.acquire(1, cost=60)
        second = asyncio.create_task(a.acquire(1, cost=60))  # a slot is free, the budget is not
        small = asyncio.create_task(a.acquire(1, cost=10))  # first come, first served: it waits behind
        await asyncio.sleep(0)
        assert not second.done() and not small.done() and (a.running, a.cost) == (1, 60)
        a.release(1, 60)
        await asyncio.gather(second, small)
        assert (a.running, a.cost) == (2, 70)
        a.release(1, 60)
        a.release(1, 10)
        assert (a.running, a.cost) == (0, 0)

    asyncio.run(main())


def test_a_request_costlier_than_the_budget_alone_is_refused():
    async def main():
        a = admission(max_cost=100)
        with pytest.raises(APIError) as e:
            await a.acquire(1, cost=101)
        assert e.value.status == 400 and "costs 101 tokens" in e.value.message and "at most 100" in e.value.message
        assert (a.running, a.cost) == (0, 0)

    asyncio.run(main())


def test_a_waiter_that_gives_up_lets_the_ones_behind_it_in():
    async def main():
        a = admission(max_cost=100)
        await a.acquire(1, cost=50)
        big = asyncio.create_task(a.acquire(1, timeout_s=0.01, cost=100))
        await asyncio.sleep(0)
        small = asyncio.create_task(a.acquire(1, cost=40))
        with pytest.raises(TimeoutError):
            await big
        await small
        assert (a.running, a.cost) == (2, 90)

    asyncio.run(main())
