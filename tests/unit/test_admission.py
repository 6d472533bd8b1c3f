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


def test_costs_count_what_a_request_reads_and_decodes():
    from rnnserve.service.gateway.cost import generation_cost, score_cost, translation_cost, translation_score_cost

    assert generation_cost("ROMEO:", 100) == 106 and generation_cost("ROMEO:", 100, echo=True) == 112
    assert score_cost(["x" * 8192] * 16) == 131_072
    # by default a text decodes up to 2 x its length + 10 tokens, capped by the model's limit, per beam
    assert translation_cost(["abc", "x" * 1000], 4, None, 256) == 3 + 4 * 16 + 1000 + 4 * 256
    assert translation_cost(["x" * 1000] * 64, 8, 256, 256, "A" * 100) == 201_472
    assert translation_score_cost("Ein Hund.", ["A dog.", "Dog a."]) == 2 * 9 + 12
