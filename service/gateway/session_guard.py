"""Sessions where several gateway processes serve one port (RNNSERVE_GATEWAY_WORKERS > 1) and no shared store
(RNNSERVE_SESSION_STORE, sessions_redis.py) is set.

The session store lives in one process's memory, and the kernel hands each connection to any of the
processes: a session begun in one would silently start afresh in another. So with several processes every
session call is refused with a clear error, and clients continue from returned states instead, which every
process verifies with the one state key they share."""
from __future__ import annotations

from rnnserve.service.gateway.errors import APIError


class SessionsUnavailable:
    """Stands in for the session store: any use of it answers 400."""

    def __init__(self, processes: int) -> None:
        self.processes = processes

    def __getattr__(self, name: str):
        def refuse(*_args, **_kwargs):
            raise APIError(400, f"sessions are held in one gateway process's memory and this service runs "
                                f"{self.processes} (RNNSERVE_GATEWAY_WORKERS); set RNNSERVE_SESSION_STORE (Redis) to "
                                "share them, or continue from a returned state instead (`return_state`, then "
                                "`state`)", "invalid_request_error", "session")
        return refuse
