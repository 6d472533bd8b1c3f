"""The session stores' one contract, checked against each: the in-memory store and the Redis store (a real
redis-server). Least recently used evicted, idle ones expire, a session serves one request at a time, a
failed first request leaves no session behind, leases, owners and quotas. The clock is a fake one."""
import contextlib

import pytest

from rnnserve.service.gateway.errors import APIError
from rnnserve.service.gateway.metrics import Metrics
from rnnserve.service.gateway.sessions import ENTRY_OVERHEAD, SessionStore
from rnnserve.service.gateway.sessions_redis import RedisSessionStore
from tests.redis_server import redis_server


class Clock:
    now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@contextlib.contextmanager
def stores(url: str | None):
    """make(**bounds) -> a store, in memory (url None) or in the Redis at `url`; make.clock moves time for every
    store it made."""
    clock = Clock()
    made = []

    def make(**kw):
        args = {"max_sessions": 3, "max_bytes": 10_000, "ttl_s": 60.0, **kw}
        if url is None:
            return SessionStore(Metrics(), clock=clock, **args)
        s = RedisSessionStore(Metrics(), url, clock=clock, **args)
        made.append(s)
        return s
    make.clock = clock
    try:
        yield make
    finally:
        for s in made:
            s.close()


@pytest.fixture(params=["memory", "redis"])
def make(request, tmp_path):
    if request.param == "memory":
        with stores(None) as m:
            yield m
    else:
        with redis_server(tmp_path) as server, stores(server.url) as m:
            yield m


def put(s, sid, blob=b"x" * 100, owner="", model="m"):
    lease = s.acquire(owner, sid, model)
    s.commit(lease, blob, 7)
    return lease


def state(s, sid, owner=""):
    """A session's state, as the next request reads it."""
    lease = s.acquire(owner, sid, "m")
    s.release(lease)
    return lease.state


def evictions(s, reason):
    return s.metrics.session_evictions.labels(model="m", reason=reason)._value.get()


def test_least_recently_used_is_evicted_first(make):
    s = make()
    for sid in "abc":
        put(s, sid)
    s.release(s.acquire("", "a", "m"))  # using a makes b the least recently used
    make.clock.now += 1
    put(s, "d")
    assert sorted(x.id for x in s.list("")) == ["a", "c", "d"]
    assert evictions(s, "capacity") == 1
    assert s.metrics.sessions.labels(model="m")._value.get() == 3
    assert s.metrics.session_bytes.labels(model="m")._value.get() == 3 * (ENTRY_OVERHEAD + 1 + 100)


def test_bytes_bound(make):
    s = make(max_sessions=100, max_bytes=3 * (ENTRY_OVERHEAD + 1 + 1000))
    for sid in "abcd":
        make.clock.now += 1
        put(s, sid, b"x" * 1000)
    assert [x.id for x in s.list("")] == ["b", "c", "d"]
    assert s.get("", "d").nbytes == ENTRY_OVERHEAD + 1 + 1000


def test_idle_sessions_expire(make):
    s = make()
    put(s, "a")
    make.clock.now += 30
    put(s, "b")
    make.clock.now += 31
    assert [x.id for x in s.list("")] == ["b"]
    assert evictions(s, "expired") == 1
    with pytest.raises(APIError) as e:
        s.get("", "a")
    assert (e.value.status, e.value.message) == (404, "session 'a' does not exist (or expired)")


def test_one_request_at_a_time_and_failed_first_requests_leave_nothing(make):
    s = make()
    lease = s.acquire("", "a", "m")
    with pytest.raises(APIError) as e:
        s.acquire("", "a", "m")
    assert (e.value.status, e.value.message) == (409, "session 'a' is in use by another request; retry when it ends")
    s.release(lease)
    assert s.list("") == []
    put(s, "a")
    lease = s.acquire("", "a", "m")
    s.release(lease)  # a failed continuation keeps the old state
    assert state(s, "a") == b"x" * 100


def test_owners_and_models_are_separate(make):
    s = make()
    put(s, "a", owner="k1")
    assert s.list("k2") == []
    with pytest.raises(APIError) as e:
        s.get("k2", "a")
    assert e.value.status == 404
    with pytest.raises(APIError) as e:
        s.acquire("k1", "a", "other-model")
    assert e.value.status == 400 and e.value.message == "session 'a' belongs to model 'm'"


def test_fork_copies_and_a_busy_session_cannot_be_deleted(make):
    s = make()
    put(s, "a")
    forked = s.fork("", "a", "b")
    assert (forked.id, forked.model, forked.tokens) == ("b", "m", 7)
    assert state(s, "b") == state(s, "a") == b"x" * 100
    with pytest.raises(APIError) as e:
        s.fork("", "a", "b")
    assert (e.value.status, e.value.param) == (409, "id")
    lease = s.acquire("", "b", "m")
    with pytest.raises(APIError) as e:
        s.delete("", "b")
    assert (e.value.status, e.value.message) == (409, "session 'b' is in use by another request; retry when it ends")
    s.commit(lease, b"new", 1)
    assert state(s, "b") == b"new"
    s.delete("", "b")
    assert [x.id for x in s.list("")] == ["a"]
    with pytest.raises(APIError) as e:
        s.delete("", "b")
    assert e.value.status == 404
    assert s.metrics.sessions.labels(model="m")._value.get() == 1


def test_commit_and_release_act_on_their_own_lease_only(make):
    s = make()
    put(s, "a", b"first")
    lease = s.acquire("", "a", "m")
    s.release(lease)
    later = s.acquire("", "a", "m")  # another request now holds the session
    s.commit(lease, b"stale", 1)  # the first lease ended: it writes nothing
    s.release(lease)
    with pytest.raises(APIError) as e:
        s.acquire("", "a", "m")
    assert e.value.status == 409  # still held by `later`
    s.commit(later, b"second", 2)
    assert (state(s, "a"), s.get("", "a").tokens) == (b"second", 2)


def test_a_key_past_its_quota_evicts_its_own_sessions_never_anothers(make):
    s = make(max_sessions=4, owner_sessions=2, max_bytes=100_000, owner_bytes=50_000)
    put(s, "theirs", owner="k2")
    put(s, "a", owner="k1")
    for i in range(50):
        make.clock.now += 1
        s.fork("k1", "a", f"f{i}")
    assert [x.id for x in s.list("k2")] == ["theirs"]
    assert sorted(x.id for x in s.list("k1")) == ["a", "f49"]  # the source is used by each fork: it stays
    assert evictions(s, "capacity") == 49


def test_a_key_whose_sessions_are_all_busy_gets_429_not_anothers_room(make):
    s = make(max_sessions=4, owner_sessions=2)
    put(s, "theirs", owner="k2")
    held = [s.acquire("k1", sid, "m") for sid in ("a", "b")]
    with pytest.raises(APIError) as e:
        s.acquire("k1", "c", "m")
    assert e.value.status == 429 and e.value.type == "quota_error"
    assert [x.id for x in s.list("k2")] == ["theirs"]
    for lease in held:
        s.commit(lease, b"x", 1)
    s.release(s.acquire("k1", "c", "m"))  # now the least recently used of k1's own makes room


def test_a_keys_bytes_quota(make):
    s = make(max_sessions=100, owner_bytes=2 * (ENTRY_OVERHEAD + 1 + 1000))
    put(s, "z", b"x" * 1000, owner="k2")
    for sid in "abc":
        make.clock.now += 1
        put(s, sid, b"x" * 1000, owner="k1")
    assert [x.id for x in s.list("k1")] == ["b", "c"]
    assert [x.id for x in s.list("k2")] == ["z"]
