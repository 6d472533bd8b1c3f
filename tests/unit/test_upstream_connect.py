import asyncio

import aiohttp
import pytest

from rnnserve.service.gateway.upstream import Upstream


class FlakySession:
    """Connecting times out `fails` times, then the request goes through."""

    def __init__(self, fails: int, error: Exception) -> None:
        self.fails, self.error, self.calls = fails, error, 0

    async def post(self, url, json, headers):
        self.calls += 1
        if self.calls <= self.fails:
            raise self.error
        return "response"


def test_a_connect_timeout_is_tried_again_until_it_connects():
    session = FlakySession(2, aiohttp.ConnectionTimeoutError("connect timed out"))
    assert asyncio.run(Upstream._post(session, "u", {}, {})) == "response"
    assert session.calls == 3


def test_a_refused_connection_fails_at_once():
    session = FlakySession(1, aiohttp.ClientConnectionError("refused"))
    with pytest.raises(aiohttp.ClientConnectionError):
        asyncio.run(Upstream._post(session, "u", {}, {}))
    assert session.calls == 1


def test_the_callers_deadline_ends_the_retries():
    class SlowTimeouts:
        calls = 0

        async def post(self, url, json, headers):
            self.calls += 1
            await asyncio.sleep(0.01)  # as a real connect attempt takes time
            raise aiohttp.ConnectionTimeoutError("connect timed out")

    session = SlowTimeouts()

    async def bounded():
        async with asyncio.timeout(0.2):  # the request's deadline (Run.next) or the readiness probe's bound
            await Upstream._post(session, "u", {}, {})

    with pytest.raises(TimeoutError):
        asyncio.run(bounded())
    assert session.calls > 1
