"""The session store's bounds, with a fake clock: least recently used evicted, idle ones expire, a
session serves one request at a time, and a failed first request leaves no session behind."""
import pytest

from rnnserve.service.gateway.errors import APIError
from rnnserve.service.gateway.metrics import Metrics
from rnnserve.service.gateway.sessions import ENTRY_OVERHEAD, SessionStore


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def store(**kw):
    clock = Clock()
    args = {"max_sessions": 3, "max_bytes": 10_000, "ttl_s": 60.0, **kw}
    return SessionStore(Metrics(), clock=clock, **args), clock


def put(s, sid, blob=b"x" * 100, owner="", model="m"):
    lease = s.acquire(owner, sid, model)
    s.commit(lease, blob, 7)
    return lease


def evictions(s, reason):
    return s.metrics.session_evictions.labels(model="m", reason=reason)._value.get()


def test_least_recently_used_is_evicted_first():
    s, _ = store()
    for sid in "abc":
        put(s, sid)
    s.release(s.acquire("", "a", "m"))  # using a makes b the least recently used
    put(s, "d")
    assert sorted(x.id for x in s.list("")) == ["a", "c", "d"]
    assert evictions(s, "capacity") == 1
    assert s.metrics.sessions.labels(model="m")._value.get() == 3


def test_bytes_bound():
    s, _ = store(max_sessions=100, max_bytes=3 * (ENTRY_OVERHEAD + 1 + 1000))
    for sid in "abcd":
        put(s, sid, b"x" * 1000)
    assert [x.id for x in s.list("")] == ["b", "c", "d"]


def test_idle_sessions_expire():
    s, clock = store()
    put(s, "a")
    clock.now = 30
    put(s, "b")
    clock.now = 61
    assert [x.id for x in s.list("")] == ["b"]
    assert evictions(s, "expired") == 1
    with pytest.raises(APIError) as e:
        s.get("", "a")
    assert e.value.status == 404


def test_one_request_at_a_time_and_failed_first_requests_leave_nothing():
    s, _ = store()
    lease = s.acquire("", "a", "m")
    with pytest.raises(APIError) as e:
        s.acquire("", "a", "m")
    assert e.value.status == 409
    s.release(lease)
    assert s.list("") == []
    put(s, "a")
    lease = s.acquire("", "a", "m")
    s.release(lease)  # a failed continuation keeps the old state
    assert s.get("", "a").state == b"x" * 100


def test_owners_and_models_are_separate():
    s, _ = store()
    put(s, "a", owner="k1")
    assert s.list("k2") == []
    with pytest.raises(APIError) as e:
        s.acquire("k1", "a", "other-model")
    assert e.value.status == 400 and e.value.message == "session 'a' belongs to model 'm'"


def test_fork_copies_and_deleting_during_a_request_wins():
    s, _ = store()
    put(s, "a")
    assert s.fork("", "a", "b").state == s.get("", "a").state
    lease = s.acquire("", "b", "m")
    s.delete("", "b")
    s.commit(lease, b"new", 1)
    assert [x.id for x in s.list("")] == ["a"]
