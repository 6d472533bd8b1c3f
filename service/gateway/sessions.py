"""Sessions the server holds: a conversation's whole memory is one state of a few kilobytes.

A request naming a session continues from its state and leaves the state after its own text there,
so a conversation of any length never re-reads its history. Sessions belong to the API key that
made them (all clients share one namespace when no keys are set). Each key has a quota per model
(count and bytes) and the quotas of all keys fit in the per-model bounds, so a key that makes more
sessions evicts its own least recently used ones, never another key's. Idle sessions expire after
`ttl_s`. One request at a time may use a session: it holds a lease from `acquire` to `commit` or
`release`, which act on that lease alone; a second request or a delete gets 409 meanwhile (a fork
copies the state the session last ended with). A session lives in one gateway process: behind several
replicas, route a conversation to one (affinity), keep sessions in Redis (sessions_redis.py, the same
semantics for every process and replica), or hold the state on the client (`return_state`), which any
replica accepts.
"""
from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.concurrency import run_in_threadpool

from rnnserve.service.gateway.errors import APIError, invalid
from rnnserve.service.gateway.metrics import Metrics

ENTRY_OVERHEAD = 256  # bytes of bookkeeping per session beside its state (id, times, dict slot)

Key = tuple[str, str]  # (owner, session id)


@dataclass
class Session:
    id: str
    model: str
    state: bytes | None = None  # None until its first request ends
    tokens: int = 0
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    lease: str | None = None  # the token of the lease that holds it; None while idle

    @property
    def busy(self) -> bool:
        return self.lease is not None

    @property
    def nbytes(self) -> int:
        return ENTRY_OVERHEAD + len(self.id) + (len(self.state) if self.state else 0)


@dataclass(frozen=True)
class Lease:
    """One request's hold on a session, from `acquire` to `commit` or `release`."""
    key: Key
    model: str
    state: bytes | None  # what the request continues from (None: a new session)
    token: str = field(default_factory=lambda: secrets.token_hex(16))


async def call(store, method: str, *args):
    """A session store's method, run off the event loop when the store may wait (Redis, up to its timeout):
    a slow store then delays only the session requests, never the other streams of the gateway process."""
    fn = getattr(store, method)
    return await run_in_threadpool(fn, *args) if store.blocking else fn(*args)


def key_owner(api_key: str) -> str:
    """The owner of the sessions and states made with an API key: a digest of the key itself ("" without keys)."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:32] if api_key else ""


class SessionStore:
    """Sessions by (owner, id). `max_sessions`/`max_bytes` bound each model; `owner_sessions`/`owner_bytes`
    (by default the same) bound each owner's sessions of a model."""

    # its calls never wait, so they run on the event loop (and never in two threads at once: no lock needed)
    blocking = False

    def __init__(self, metrics: Metrics, max_sessions: int, max_bytes: int, ttl_s: float,
                 owner_sessions: int | None = None, owner_bytes: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.max_sessions, self.max_bytes, self.ttl_s = max_sessions, max_bytes, ttl_s
        self.owner_sessions = owner_sessions or max_sessions
        self.owner_bytes = owner_bytes or max_bytes
        self.clock = clock
        self._sessions: OrderedDict[Key, Session] = OrderedDict()  # least recently used first
        self._touched: dict[Key, float] = {}  # clock time of last use, for expiry
        # per model and per (owner, model): sessions and their bytes, kept as they change so that the
        # bounds cost nothing per request; each owner's sessions of a model in order of use
        self._count: dict[str, int] = {}
        self._bytes: dict[str, int] = {}
        self._groups: dict[tuple[str, str], OrderedDict[Key, None]] = {}
        self._group_bytes: dict[tuple[str, str], int] = {}

    # -- requests ------------------------------------------------------------------------------
    def acquire(self, owner: str, session_id: str, model: str) -> Lease:
        self._expire()
        key = (owner, session_id)
        s = self._sessions.get(key)
        if s is None:
            self._make_room(owner, model)
            s = self._add(key, Session(session_id, model))
        elif s.model != model:
            raise invalid(f"session {session_id!r} belongs to model {s.model!r}", "session")
        if s.busy:
            raise _in_use(session_id)
        lease = Lease(key, model, s.state)
        s.lease = lease.token
        self._use(key)
        return lease

    def commit(self, lease: Lease, state: bytes, tokens: int) -> None:
        """The request ended with a new state: it becomes the session's, if the lease still holds it."""
        s = self._held(lease)
        if s is None:
            return
        self._resize(lease.key, s, state)
        s.tokens, s.lease = tokens, None
        s.last_used = time.time()
        self._use(lease.key)
        self._bound(lease.key[0], s.model)
        self._report(s.model)

    def release(self, lease: Lease) -> None:
        """The request ended without a new state (failed, cancelled): the session keeps its old one."""
        s = self._held(lease)
        if s is None:
            return
        s.lease = None
        if s.state is None:  # a new session whose first request failed never existed
            self._remove(lease.key)

    # -- management ----------------------------------------------------------------------------
    def get(self, owner: str, session_id: str) -> Session:
        self._expire()
        s = self._sessions.get((owner, session_id))
        if s is None or s.state is None:
            raise APIError(404, f"session {session_id!r} does not exist (or expired)", "not_found_error", "session")
        return s

    def list(self, owner: str) -> list[Session]:
        self._expire()
        return [s for (o, _), s in self._sessions.items() if o == owner and s.state is not None]

    def delete(self, owner: str, session_id: str) -> None:
        """409 while a request uses the session: its end would otherwise write into a deleted (or a new) one."""
        s = self.get(owner, session_id)
        if s.busy:
            raise _in_use(session_id)
        self._remove((owner, session_id))
        self._report(s.model)

    def fork(self, owner: str, session_id: str, new_id: str) -> Session:
        s = self.get(owner, session_id)
        if (owner, new_id) in self._sessions:
            raise APIError(409, f"session {new_id!r} already exists", "conflict_error", "id")
        self._use((owner, session_id))  # the source is in use: it is not what room is made from
        self._make_room(owner, s.model)
        copy = self._add((owner, new_id), Session(new_id, s.model))
        self._resize((owner, new_id), copy, s.state)
        copy.tokens = s.tokens
        self._use((owner, new_id))
        self._bound(owner, s.model)
        self._report(s.model)
        return copy

    # -- bounds --------------------------------------------------------------------------------
    def _held(self, lease: Lease) -> Session | None:
        s = self._sessions.get(lease.key)
        return s if s is not None and s.lease == lease.token else None

    def _use(self, key: Key) -> None:
        self._sessions.move_to_end(key)
        self._touched[key] = self.clock()
        self._groups[(key[0], self._sessions[key].model)].move_to_end(key)

    def _expire(self) -> None:
        """The sessions are kept in order of last use: the expired ones are at the front."""
        now = self.clock()
        expired = []
        for key, s in self._sessions.items():
            if now - self._touched[key] <= self.ttl_s:
                break
            if not s.busy:
                expired.append(key)
        for key in expired:
            self._evict(key, "expired")

    def _make_room(self, owner: str, model: str) -> None:
        """Room for one more session of the owner's: its own least recently used idle ones go first; when
        every one of them is in use, 429."""
        while self._group_size(owner, model) + 1 > self.owner_sessions:
            oldest = self._oldest_idle(owner, model)
            if oldest is None:
                raise APIError(429, f"this API key's {self.owner_sessions} sessions of model {model!r} are all "
                                    "in use; retry when one ends, or delete one", "quota_error", "session",
                               headers={"Retry-After": "1"})
            self._evict(oldest, "capacity")

    def _bound(self, owner: str, model: str) -> None:
        """Evict the owner's least recently used idle sessions of the model until it is within its quota,
        then (should quotas and bounds disagree) the model's."""
        group = (owner, model)
        while (self._group_size(owner, model) > self.owner_sessions
               or self._group_bytes.get(group, 0) > self.owner_bytes):
            oldest = self._oldest_idle(owner, model)
            if oldest is None:
                break
            self._evict(oldest, "capacity")
        while self._count.get(model, 0) > self.max_sessions or self._bytes.get(model, 0) > self.max_bytes:
            oldest = next((k for k, s in self._sessions.items() if s.model == model and not s.busy), None)
            if oldest is None:
                return
            self._evict(oldest, "capacity")

    def _group_size(self, owner: str, model: str) -> int:
        return len(self._groups.get((owner, model), ()))

    def _oldest_idle(self, owner: str, model: str) -> Key | None:
        return next((k for k in self._groups.get((owner, model), ()) if not self._sessions[k].busy), None)

    def _resize(self, key: Key, s: Session, state: bytes | None) -> None:
        before = s.nbytes
        s.state = state
        self._bytes[s.model] += s.nbytes - before
        group = (key[0], s.model)
        self._group_bytes[group] += s.nbytes - before

    def _add(self, key: Key, s: Session) -> Session:
        self._sessions[key] = s
        group = (key[0], s.model)
        self._groups.setdefault(group, OrderedDict())[key] = None
        self._group_bytes[group] = self._group_bytes.get(group, 0) + s.nbytes
        self._count[s.model] = self._count.get(s.model, 0) + 1
        self._bytes[s.model] = self._bytes.get(s.model, 0) + s.nbytes
        return s

    def _remove(self, key: Key) -> Session:
        s = self._sessions.pop(key)
        self._touched.pop(key, None)
        group = (key[0], s.model)
        del self._groups[group][key]
        self._group_bytes[group] -= s.nbytes
        if not self._groups[group]:
            del self._groups[group], self._group_bytes[group]
        self._count[s.model] -= 1
        self._bytes[s.model] -= s.nbytes
        return s

    def _evict(self, key: Key, reason: str) -> None:
        s = self._remove(key)
        if s.state is not None:
            self.metrics.session_evictions.labels(model=s.model, reason=reason).inc()
        self._report(s.model)

    def _report(self, model: str) -> None:
        self.metrics.sessions.labels(model=model).set(self._count.get(model, 0))
        self.metrics.session_bytes.labels(model=model).set(self._bytes.get(model, 0))


def _in_use(session_id: str) -> APIError:
    return APIError(409, f"session {session_id!r} is in use by another request; retry when it ends",
                    "conflict_error", "session")
