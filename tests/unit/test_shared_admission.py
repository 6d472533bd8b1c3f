"""Admission shared by gateway processes (slots.py): two SharedAdmission objects over one counters file stand in
for two processes (each claims its own column under its own pid)."""
import asyncio
import os
import subprocess
import sys

import pytest

from rnnserve.service.gateway.admission import SharedAdmission
from rnnserve.service.gateway.errors import APIError
from rnnserve.service.gateway.metrics import Metrics
from rnnserve.service.gateway.slots import RUNNING, WAITING, SharedCounts


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _pair(tmp_path, max_running=2, max_waiting=1, pids=None):
    pids = pids or (os.getpid(), os.getppid())
    counts = [SharedCounts(tmp_path / "admission", ["m"], 2, pid=pid) for pid in pids]
    return counts, [SharedAdmission("m", max_running, max_waiting, Metrics(), c) for c in counts]


def test_the_bounds_hold_across_processes_and_a_freed_slot_reaches_the_other_process(tmp_path):
    counts, (a, b) = _pair(tmp_path)
    assert counts[0].column != counts[1].column

    async def run():
        await a.acquire()
        await a.acquire()  # the service's two slots, both in process a
        queued = asyncio.create_task(b.acquire(timeout_s=30))  # b has room of its own, but the service has none
        await asyncio.sleep(0.05)
        assert not queued.done()
        with counts[1].locked():
            assert (counts[1].total("m", RUNNING), counts[1].total("m", WAITING)) == (2, 1)
        for adm in (a, b):
            with pytest.raises(APIError) as e:
                await adm.acquire()
            assert e.value.status == 429 and e.value.headers == {"Retry-After": "1"}
        a.release()
        await asyncio.wait_for(queued, 30)  # b sees the slot a freed (by polling)
        with counts[0].locked():
            own = (counts[0].own("m", RUNNING), counts[1].own("m", RUNNING))
            assert (*own, counts[0].total("m", WAITING)) == (1, 1, 0)

    asyncio.run(run())


def test_a_waiter_that_gives_up_leaves_no_count_behind(tmp_path):
    counts, (a, b) = _pair(tmp_path, max_running=1)

    async def run():
        await a.acquire()
        with pytest.raises(TimeoutError):
            await b.acquire(timeout_s=0.05)
        with counts[0].locked():
            assert counts[0].total("m", WAITING) == 0

    asyncio.run(run())


def test_slots_of_a_dead_process_are_taken_back(tmp_path):
    counts, (alive, dead) = _pair(tmp_path, max_running=1, max_waiting=0, pids=(os.getpid(), _dead_pid()))

    async def run():
        await dead.acquire()  # a process that then died holding its slot
        await asyncio.wait_for(alive.acquire(), 5)  # full, so the dead one's column is checked and freed

    asyncio.run(run())
    with counts[0].locked():
        assert counts[0].total("m", RUNNING) == 1 and counts[0].own("m", RUNNING) == 1


def test_a_process_that_replaces_a_dead_one_takes_its_column_over_zeroed(tmp_path):
    dead = SharedCounts(tmp_path / "admission", ["m"], 1, pid=_dead_pid())
    with dead.locked():
        dead.add("m", RUNNING, 3)
    told = []
    new = SharedCounts(tmp_path / "admission", ["m"], 1, pid=os.getpid(), on_dead=told.append)
    with new.locked():
        assert new.column == dead.column == 0 and new.total("m", RUNNING) == 0
    assert told == [dead.pid]  # its metrics files are marked dead too (app.py)
    with pytest.raises(RuntimeError, match="more than 1 live gateway processes"):
        SharedCounts(tmp_path / "admission", ["m"], 1, pid=os.getppid())


def test_the_token_budget_holds_across_processes(tmp_path):
    from rnnserve.service.gateway.slots import COST

    pids = (os.getpid(), os.getppid())
    counts = [SharedCounts(tmp_path / "admission", ["m"], 2, pid=pid) for pid in pids]
    a, b = (SharedAdmission("m", 8, 4, Metrics(), c, max_cost=100) for c in counts)

    async def run():
        await a.acquire(cost=70)
        with pytest.raises(APIError) as e:  # could never run, however long it waited
            await b.acquire(cost=101)
        assert e.value.status == 400 and "costs 101 tokens" in e.value.message
        queued = asyncio.create_task(b.acquire(cost=40, timeout_s=30))  # slots free, but 70 + 40 > 100
        await asyncio.sleep(0.05)
        assert not queued.done()
        a.release(cost=70)
        await asyncio.wait_for(queued, 30)
        with counts[1].locked():
            assert (counts[1].total("m", COST), counts[1].own("m", COST), counts[0].own("m", COST)) == (40, 40, 0)
        b.release(cost=40)
        with counts[0].locked():
            assert counts[0].total("m", COST) == 0

    asyncio.run(run())
