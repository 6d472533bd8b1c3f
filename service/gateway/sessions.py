"""Sessions the server holds: a conversation's whole memory is one state of a few kilobytes.

A request naming a session continues from its state and leaves the state after its own text there,
so a conversation of any length never re-reads its history. Sessions belong to the API key that
made them, are bounded per model (count and bytes: the least recently used go first) and expire
after `ttl_s` unused. One request at a time may use a session: a second gets 409 until the first
ends. A session lives in one gateway process: behind several replicas, route a conversation to one
(affinity), or hold the state on the client (`return_state`), which any replica accepts.
"""
from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from rnnserve.service.gateway.errors import APIError, invalid
from rnnserve.service.gateway.metrics import Metrics

ENTRY_OVERHEAD = 256  # bytes of bookkeeping per session beside its state (id, times, dict slot)


@dataclass
class Session:
    id: str
    model: str
    state: bytes | None = None  # None until its first request ends
    tokens: int = 0
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    busy: bool = False

    @property
    def nbytes(self) -> int:
        return ENTRY_OVERHEAD + len(self.id) + (len(self.state) if self.state else 0)


@dataclass
class Lease:
    """One request's hold on a session, from `acquire` to `commit` or `release`."""
    key: tuple[str, str]
    model: str
    state: bytes | None  # what the request continues from (None: a new session)


def owner_of(authorization: str | None) -> str:
    """Sessions are scoped by the API key that made them (a digest of it; "" without keys)."""
    if not authorization:
        return ""
    return hashlib.sha256(authorization.encode()).hexdigest()[:32]


class SessionStore:
    def __init__(self, metrics: Metrics, max_sessions: int, max_bytes: int, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.max_sessions, self.max_bytes, self.ttl_s = max_sessions, max_bytes, ttl_s
        self.clock = clock
        self._sessions: OrderedDict[tuple[str, str], Session] = OrderedDict()  # least recently used first
        self._touched: dict[tuple[str, str], float] = {}  # clock time of last use, for expiry
        self._count: dict[str, int] = {}  # per model: sessions, and their bytes (kept as they change,
        self._bytes: dict[str, int] = {}  # so that the bounds cost nothing per request)

    # -- requests ------------------------------------------------------------------------------
    def acquire(self, owner: str, session_id: str, model: str) -> Lease:
        self._expire()
        key = (owner, session_id)
        s = self._sessions.get(key)
        if s is None:
            s = self._add(key, Session(session_id, model))
        elif s.model != model:
            raise invalid(f"session {session_id!r} belongs to model {s.model!r}", "session")
        if s.busy:
            raise APIError(409, f"session {session_id!r} is in use by another request; retry when it ends",
                           "conflict_error", "session")
        s.busy = True
        self._use(key)
        return Lease(key, model, s.state)

    def commit(self, lease: Lease, state: bytes, tokens: int) -> None:
        s = self._sessions.get(lease.key)
        if s is None:  # deleted while the request ran: the deletion wins
            return
        self._bytes[s.model] -= s.nbytes
        s.state, s.tokens, s.busy = state, tokens, False
        self._bytes[s.model] += s.nbytes
        s.last_used = time.time()
        self._use(lease.key)
        self._bound(lease.model)
        self._report(lease.model)

    def release(self, lease: Lease) -> None:
        """The request ended without a new state (failed, cancelled): the session keeps its old one."""
        s = self._sessions.get(lease.key)
        if s is None or not s.busy:
            return
        s.busy = False
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
        s = self.get(owner, session_id)
        self._remove((owner, session_id))
        self._report(s.model)

    def fork(self, owner: str, session_id: str, new_id: str) -> Session:
        s = self.get(owner, session_id)
        if (owner, new_id) in self._sessions:
            raise APIError(409, f"session {new_id!r} already exists", "conflict_error", "id")
        copy = self._add((owner, new_id), Session(new_id, s.model, s.state, s.tokens))
        self._use((owner, new_id))
        self._bound(s.model)
        self._report(s.model)
        return copy

    # -- bounds --------------------------------------------------------------------------------
    def _use(self, key: tuple[str, str]) -> None:
        self._sessions.move_to_end(key)
        self._touched[key] = self.clock()

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

    def _bound(self, model: str) -> None:
        """Evict the model's least recently used idle sessions until it is within its bounds."""
        while self._count.get(model, 0) > self.max_sessions or self._bytes.get(model, 0) > self.max_bytes:
            oldest = next((k for k, s in self._sessions.items() if s.model == model and not s.busy), None)
            if oldest is None:
                return
            self._evict(oldest, "capacity")

    def _add(self, key: tuple[str, str], s: Session) -> Session:
        self._sessions[key] = s
        self._count[s.model] = self._count.get(s.model, 0) + 1
        self._bytes[s.model] = self._bytes.get(s.model, 0) + s.nbytes
        return s

    def _remove(self, key: tuple[str, str]) -> Session:
        s = self._sessions.pop(key)
        self._touched.pop(key, None)
        self._count[s.model] -= 1
        self._bytes[s.model] -= s.nbytes
        return s

    def _evict(self, key: tuple[str, str], reason: str) -> None:
        s = self._remove(key)
        if s.state is not None:
            self.metrics.session_evictions.labels(model=s.model, reason=reason).inc()
        self._report(s.model)

    def _report(self, model: str) -> None:
        self.metrics.sessions.labels(model=model).set(self._count.get(model, 0))
        self.metrics.session_bytes.labels(model=model).set(self._bytes.get(model, 0))
