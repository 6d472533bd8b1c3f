"""Sessions in Redis (RNNSERVE_SESSION_STORE=redis://host:port/db): one store for every gateway process and replica.

The same interface and semantics as `SessionStore` (sessions.py): per-model and per-key bounds, expiry after
`ttl_s` idle, least recently used evicted, one request at a time per session through the lease token, fork,
delete (409 while busy), list. Each operation is one Lua script (sessions_redis.lua), atomic in Redis, so a
session is never half written and two processes never both hold one. States are stored as Redis strings.
When Redis is down or slower than the socket timeout, a session call answers 503 within that bound.
A lease held longer than `lease_s` (a request's longest life) is taken to belong to a request that can no
longer end it: its process died, or Redis was unreachable when it ended.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from rnnserve.service.gateway.errors import APIError, invalid
from rnnserve.service.gateway.metrics import Metrics
from rnnserve.service.gateway.sessions import ENTRY_OVERHEAD, Lease, _in_use

log = logging.getLogger(__name__)

_HELPERS = (Path(__file__).with_name("sessions_redis.lua")).read_text()

# each operation's body; its own arguments start at ARGV[10]
_OPS = {
    "acquire": """
local owner, id, model, token = ARGV[10], ARGV[11], ARGV[12], ARGV[13]
local member = owner .. '/' .. id
expire()
local k = skey(member)
local have = redis.call('HGET', k, 'model')
if not have then
  if not make_room(owner, model) then return answer('quota') end
  add(member, owner, model, id, nil, 0)
elseif have ~= model then
  return answer('model', have)
end
if busy(k) then return answer('busy') end
redis.call('HSET', k, 'lease', token, 'leased_at', now)
use(member, owner, model)
return answer('ok', redis.call('HGET', k, 'state') or '')
""",
    "commit": """
local owner, id, token, state, tokens = ARGV[10], ARGV[11], ARGV[12], ARGV[13], ARGV[14]
local member = owner .. '/' .. id
local k = skey(member)
local h = redis.call('HMGET', k, 'lease', 'model', 'nbytes')
if h[1] ~= token then return answer('gone') end
local model, before = h[2], tonumber(h[3])
local nb = overhead + #id + #state
redis.call('HSET', k, 'state', state, 'has_state', 1, 'tokens', tokens, 'nbytes', nb, 'lease', '', 'used', now)
redis.call('HINCRBY', ckey(model), 'bytes', nb - before)
redis.call('INCRBY', gbkey(owner, model), nb - before)
touched[model] = true
use(member, owner, model)
bound(owner, model)
return answer('ok')
""",
    "release": """
local owner, id, token = ARGV[10], ARGV[11], ARGV[12]
local member = owner .. '/' .. id
local k = skey(member)
if redis.call('HGET', k, 'lease') ~= token then return answer('gone') end
if redis.call('HGET', k, 'has_state') == '1' then
  redis.call('HSET', k, 'lease', '')
else  -- a new session whose first request failed never existed
  remove(member, nil)
end
return answer('ok')
""",
    "get": """
local member = ARGV[10] .. '/' .. ARGV[11]
expire()
if not exists_with_state(member) then return answer('missing') end
return answer('ok', info(member))
""",
    "list": """
local owner = ARGV[10]
expire()
local out = {}
for _, m in ipairs(redis.call('ZRANGE', okey(owner), 0, -1)) do
  if exists_with_state(m) then table.insert(out, info(m)) end
end
return answer('ok', out)
""",
    "delete": """
local member = ARGV[10] .. '/' .. ARGV[11]
expire()
if not exists_with_state(member) then return answer('missing') end
if busy(skey(member)) then return answer('busy') end
remove(member, nil)
return answer('ok')
""",
    "fork": """
local owner, id, new_id = ARGV[10], ARGV[11], ARGV[12]
local member, new_member = owner .. '/' .. id, owner .. '/' .. new_id
expire()
if not exists_with_state(member) then return answer('missing') end
if redis.call('EXISTS', skey(new_member)) == 1 then return answer('exists') end
local h = redis.call('HMGET', skey(member), 'model', 'state', 'tokens')
local model = h[1]
use(member, owner, model)  -- the source is in use: it is not what room is made from
if not make_room(owner, model) then return answer('quota') end
add(new_member, owner, model, new_id, h[2], tonumber(h[3]))
bound(owner, model)
return answer('ok', info(new_member))
""",
}


@dataclass
class StoredSession:
    """What `get`, `list` and `fork` answer: a session's description, without its state."""
    id: str
    model: str
    tokens: int
    nbytes: int
    created: float
    last_used: float


def _session(fields: list) -> StoredSession:
    id_, model, tokens, nbytes, created, used = (f.decode() if isinstance(f, bytes) else f for f in fields)
    return StoredSession(id_, model, int(tokens), int(nbytes), float(created), float(used))


class RedisSessionStore:
    """Sessions by (owner, id) in one Redis database; the bounds as `SessionStore`'s."""

    blocking = True  # each call waits on Redis, up to the timeout: the gateway runs it off its event loop

    def __init__(self, metrics: Metrics, url: str, max_sessions: int, max_bytes: int, ttl_s: float,
                 owner_sessions: int | None = None, owner_bytes: int | None = None, *, timeout_s: float = 1.0,
                 lease_s: float | None = None, prefix: str = "rnnserve:sessions:",
                 clock: Callable[[], float] = time.time) -> None:
        self.metrics = metrics
        self.max_sessions, self.max_bytes, self.ttl_s = max_sessions, max_bytes, ttl_s
        self.owner_sessions = owner_sessions or max_sessions
        self.owner_bytes = owner_bytes or max_bytes
        self.prefix, self.clock = prefix, clock
        # how long a lease may be held: past it, its request cannot still be running (its process died, or
        # Redis was unreachable when it ended)
        self.lease_s = lease_s or ttl_s
        # no retries: a call fails within one timeout, and a script is never run twice
        self.redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                          retry=Retry(NoBackoff(), 0), retry_on_timeout=False,
                                          single_connection_client=False)
        self._scripts = {name: self.redis.register_script(_HELPERS + body) for name, body in _OPS.items()}

    # -- requests ------------------------------------------------------------------------------
    def acquire(self, owner: str, session_id: str, model: str) -> Lease:
        lease = Lease((owner, session_id), model, None)
        status, value = self._run("acquire", owner, session_id, model, lease.token)
        if status == "quota":
            raise APIError(429, f"this API key's {self.owner_sessions} sessions of model {model!r} are all "
                                "in use; retry when one ends, or delete one", "quota_error", "session",
                           headers={"Retry-After": "1"})
        if status == "model":
            raise invalid(f"session {session_id!r} belongs to model {value.decode()!r}", "session")
        if status == "busy":
            raise _in_use(session_id)
        return Lease(lease.key, model, value or None, lease.token)

    def commit(self, lease: Lease, state: bytes, tokens: int) -> None:
        """The request ended with a new state: it becomes the session's, if the lease still holds it."""
        self._run("commit", *lease.key, lease.token, state, tokens)

    def release(self, lease: Lease) -> None:
        """The request ended without a new state: the session keeps its old one. With Redis unreachable the
        lease lapses after `lease_s`."""
        try:
            self._run("release", *lease.key, lease.token)
        except APIError:
            log.warning("could not release session %r: Redis unreachable", lease.key[1])

    # -- management ----------------------------------------------------------------------------
    def get(self, owner: str, session_id: str) -> StoredSession:
        status, value = self._run("get", owner, session_id)
        if status == "missing":
            raise _missing(session_id)
        return _session(value)

    def list(self, owner: str) -> list[StoredSession]:
        return [_session(v) for v in self._run("list", owner)[1]]

    def delete(self, owner: str, session_id: str) -> None:
        status, _ = self._run("delete", owner, session_id)
        if status == "missing":
            raise _missing(session_id)
        if status == "busy":
            raise _in_use(session_id)

    def fork(self, owner: str, session_id: str, new_id: str) -> StoredSession:
        status, value = self._run("fork", owner, session_id, new_id)
        if status == "missing":
            raise _missing(session_id)
        if status == "exists":
            raise APIError(409, f"session {new_id!r} already exists", "conflict_error", "id")
        if status == "quota":
            raise APIError(429, f"this API key's {self.owner_sessions} sessions are all in use; retry when one "
                                "ends, or delete one", "quota_error", "session", headers={"Retry-After": "1"})
        return _session(value)

    def close(self) -> None:
        self.redis.close()

    # -- the scripts ---------------------------------------------------------------------------
    def _run(self, op: str, *args) -> tuple[str, object]:
        argv = [self.prefix, repr(self.clock()), repr(self.ttl_s), self.max_sessions, self.max_bytes,
                self.owner_sessions, self.owner_bytes, ENTRY_OVERHEAD, repr(self.lease_s), *args]
        try:
            status, value, evictions, totals = self._scripts[op](args=argv)
        except redis.RedisError as e:
            log.warning("session store (Redis) failed: %s", e)
            raise APIError(503, "the session store is unavailable; retry later, or continue from a returned "
                                "state instead (`return_state`, then `state`)", "unavailable_error", "session",
                           headers={"Retry-After": "1"}) from None
        for model, reason in zip(evictions[::2], evictions[1::2]):
            self.metrics.session_evictions.labels(model=model.decode(), reason=reason.decode()).inc()
        for i in range(0, len(totals), 3):
            model = totals[i].decode()
            self.metrics.sessions.labels(model=model).set(int(totals[i + 1]))
            self.metrics.session_bytes.labels(model=model).set(int(totals[i + 2]))
        return status.decode(), value


def _missing(session_id: str) -> APIError:
    return APIError(404, f"session {session_id!r} does not exist (or expired)", "not_found_error", "session")
