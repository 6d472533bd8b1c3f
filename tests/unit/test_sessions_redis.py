"""What only the Redis session store does, against a real redis-server: one store shared by every store object
(as by every gateway process) that names the same Redis, exact bytes, leases that end on their own, and 503
when Redis is gone. The contract both stores keep is in test_session_stores.py. The clock is a fake one."""
import time

import pytest

from rnnserve.service.gateway.errors import APIError
from tests.redis_server import redis_server
from tests.unit.test_session_stores import put, state, stores


@pytest.fixture
def server(tmp_path):
    with redis_server(tmp_path) as s:
        yield s


@pytest.fixture
def make(server):
    with stores(server.url) as m:
        yield m


def test_one_request_at_a_time_across_processes_and_failed_first_requests_leave_nothing(make):
    one, other = make(), make()  # two gateway processes
    lease = one.acquire("", "a", "m")
    with pytest.raises(APIError) as e:
        other.acquire("", "a", "m")
    assert (e.value.status, e.value.message) == (409, "session 'a' is in use by another request; retry when it ends")
    one.release(lease)
    assert other.list("") == []
    put(one, "a", b"from one")
    assert state(other, "a") == b"from one"
    lease = other.acquire("", "a", "m")
    other.release(lease)  # a failed continuation keeps the old state
    assert state(one, "a") == b"from one"


def test_states_are_bytes_exactly(make):
    s = make(max_bytes=100_000)
    blob = bytes(range(256)) * 40
    put(s, "a", blob)
    assert state(s, "a") == blob
    assert s.get("", "a").tokens == 7


def test_a_lease_outlives_its_request_only_until_lease_s(make):
    s = make(lease_s=20.0)
    put(s, "a", b"kept")
    s.acquire("", "a", "m")  # its process dies holding it (or Redis was unreachable when it ended)
    make.clock.now += 19
    with pytest.raises(APIError) as e:
        s.acquire("", "a", "m")
    assert e.value.status == 409
    make.clock.now += 2
    lease = s.acquire("", "a", "m")
    assert lease.state == b"kept"


def test_redis_gone_gives_503_within_the_timeout_and_no_half_written_session(make, server):
    s = make()
    put(s, "a", b"kept")
    lease = s.acquire("", "a", "m")
    server.stop()
    t0 = time.monotonic()
    with pytest.raises(APIError) as e:
        s.acquire("", "b", "m")
    assert (e.value.status, e.value.type, e.value.param) == (503, "unavailable_error", "session")
    assert time.monotonic() - t0 < 30  # a bound that only a hang (retries without end) reaches
    with pytest.raises(APIError) as e:
        s.commit(lease, b"lost", 1)
    assert e.value.status == 503
    s.release(lease)  # logged, not raised: the request ends either way
    server.start()  # an empty Redis (no persistence here): nothing half written is left in it either
    assert s.list("") == []
    put(s, "a", b"again")
    assert state(s, "a") == b"again"


def test_the_setting_names_a_redis_url():
    from pydantic import ValidationError

    from rnnserve.service.settings import Settings
    assert Settings(session_store="redis://10.0.0.5:6379/2").session_store == "redis://10.0.0.5:6379/2"
    assert Settings().session_store is None  # in-memory by default
    with pytest.raises(ValidationError):
        Settings(session_store="http://10.0.0.5:6379")
