"""A session store that waits (Redis) is called off the event loop, one that never waits (in memory) on it."""
import asyncio
import threading

from rnnserve.service.gateway.sessions import call


class WaitingStore:
    """Stands for Redis that answers only when told: commit waits until `answer` is set."""
    blocking = True

    def __init__(self) -> None:
        self.answer = threading.Event()
        self.threads: list[str] = []

    def commit(self, lease, state, tokens) -> str:
        self.threads.append(threading.current_thread().name)
        assert self.answer.wait(timeout=30), "the event loop was blocked while the store waited"
        return "committed"


class MemoryStore(WaitingStore):
    blocking = False

    def commit(self, lease, state, tokens) -> str:
        self.threads.append(threading.current_thread().name)
        return "committed"


def test_a_waiting_store_leaves_the_event_loop_free():
    async def main() -> str:
        store = WaitingStore()
        pending = asyncio.create_task(call(store, "commit", None, b"s", 1))
        await asyncio.sleep(0)  # the call starts, and waits on the store in a thread ...
        while not store.threads:
            await asyncio.sleep(0.01)
        store.answer.set()  # ... while the loop goes on: another request's work, here the store's answer
        result = await asyncio.wait_for(pending, 30)
        assert store.threads != [threading.current_thread().name]
        return result
    assert asyncio.run(main()) == "committed"


def test_a_store_that_never_waits_runs_on_the_event_loop():
    async def main() -> list[str]:
        store = MemoryStore()
        assert await call(store, "commit", None, b"s", 1) == "committed"
        return store.threads
    assert asyncio.run(main()) == [threading.current_thread().name]
