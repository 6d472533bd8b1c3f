"""Dependencies of the routes, as Annotated aliases.

All `async def`: FastAPI runs a plain `def` dependency in a worker thread, a hop that costs more
than the dependency itself on every request."""
from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from pydantic import SecretStr

from rnnserve.service.gateway.errors import APIError
from rnnserve.service.gateway.metrics import Metrics
from rnnserve.service.gateway.readiness import Readiness
from rnnserve.service.gateway.registry import Registry
from rnnserve.service.gateway.sessions import key_owner


async def require_api_key(request: Request) -> None:
    """`Authorization: Bearer <key>` when API keys are configured. Sets `request.state.owner`, whose sessions
    and states the request may use (`api_key_owner`)."""
    request.state.owner = ""
    keys = request.app.state.settings.api_keys
    if keys:
        request.state.owner = api_key_owner(keys, request.headers.get("authorization", ""))


def api_key_owner(keys: list[SecretStr], header: str) -> str:
    """The owner of the key an Authorization header carries, every key compared in constant time: the key's
    digest, the same however the header is spelt (scheme in any case, any spaces). APIError 401 otherwise."""
    scheme, _, token = header.strip().partition(" ")
    given = token.strip()
    ok = False
    for key in keys:  # no early exit: time does not tell which key (or how much of one) matched
        ok |= hmac.compare_digest(given.encode(), key.get_secret_value().encode())
    if scheme.lower() != "bearer" or not ok:
        raise APIError(401, "missing or invalid API key; send `Authorization: Bearer <key>`",
                       "authentication_error", headers={"WWW-Authenticate": "Bearer"})
    return key_owner(given)


def owner(request: Request) -> str:
    """The caller's owner id (set by require_api_key, which every API route runs first)."""
    return request.state.owner


def _state(name: str):
    async def get(request: Request):
        return getattr(request.app.state, name)
    return get


RegistryDep = Annotated[Registry, Depends(_state("registry"))]
MetricsDep = Annotated[Metrics, Depends(_state("metrics"))]
ReadinessDep = Annotated[Readiness, Depends(_state("readiness"))]


async def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "-")


RequestIdDep = Annotated[str, Depends(request_id)]
