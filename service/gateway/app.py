"""The gateway's app factory: settings, shared clients, middleware and error handlers, in one place."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import TYPE_CHECKING

from fastapi import FastAPI, HTTPException
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import multiprocess

from rnnserve import __version__
from rnnserve.service.gateway.admission import Admission, SharedAdmission
from rnnserve.service.gateway.docs import install_docs
from rnnserve.service.gateway.errors import APIError, install_error_handlers
from rnnserve.service.gateway.metrics import Metrics
from rnnserve.service.gateway.readiness import Readiness
from rnnserve.service.gateway.registry import Registry
from rnnserve.service.gateway.session_guard import SessionsUnavailable
from rnnserve.service.gateway.sessions import SessionStore
from rnnserve.service.gateway.sessions_redis import RedisSessionStore
from rnnserve.service.gateway.slots import SharedCounts
from rnnserve.service.gateway.states import StateSigner
from rnnserve.service.gateway.upstream import Upstream
from rnnserve.service.settings import Settings

if TYPE_CHECKING:
    from rnnserve.service.gateway.fastpath import FastPath

log = logging.getLogger(__name__)

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on every log record (format field %(request_id)s)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def request_id_of(headers: dict[bytes, bytes]) -> str:
    """The request's X-Request-Id when well-formed, else a new one."""
    given = headers.get(b"x-request-id", b"").decode("latin-1")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


class RequestContextMiddleware:
    """X-Request-Id (accepted when well-formed, else generated) and the request body size limit.

    Plain ASGI rather than BaseHTTPMiddleware, which would buffer streams and swallow cancellation.
    """

    def __init__(self, app, max_body_bytes: int) -> None:
        self.app, self.max_body = app, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        rid = request_id_of(headers)
        token = request_id_var.set(rid)
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        try:
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                err = APIError(413, f"request body is larger than {self.max_body} bytes", "invalid_request_error")
                return await _send_json(send_with_id, err)
            seen = 0

            async def limited_receive():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.max_body:
                        raise _BodyTooLarge(self.max_body)
                return message

            try:
                await self.app(scope, limited_receive, send_with_id)
            except _BodyTooLarge:
                await _send_json(send_with_id, APIError(413, f"request body is larger than {self.max_body} bytes",
                                                        "invalid_request_error"))
        finally:
            request_id_var.reset(token)


class _BodyTooLarge(HTTPException):
    """Raised while the body is read: FastAPI lets an HTTPException through its body parsing (anything
    else becomes a 400), so a chunked body past the limit gets the same 413 as a declared one."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than {limit} bytes")


async def _send_json(send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Gateway(FastAPI):
    """The FastAPI app, with the streamed generation requests first offered to the fast path (fastpath.py),
    which hands back everything it does not take."""

    fast_path: FastPath | None = None

    async def __call__(self, scope, receive, send) -> None:
        fast = self.fast_path
        if fast is not None and scope["type"] == "http" and scope["path"] in fast.routes and scope["method"] == "POST":
            return await fast(scope, receive, send, super().__call__)
        await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    registry = Registry.from_settings(settings)
    metrics = Metrics(shared_sessions=settings.session_store is not None)
    admissions: dict[str, Admission] = {}
    counts = None
    if settings.gateway_workers > 1:  # one of several gateway processes (launcher.py): bounds for the service
        if settings.gateway_shared_dir is None:
            raise RuntimeError("RNNSERVE_GATEWAY_WORKERS > 1 needs the launcher "
                               "(`rnnserve serve` or `rnnserve gateway`)")
        # a dead process's gauges (requests running, sessions) must stop counting in the service's sums
        counts = SharedCounts(settings.gateway_shared_dir / "admission", list(registry.models),
                              settings.gateway_workers, on_dead=multiprocess.mark_process_dead)
    for name in registry.models:
        metrics.init_model(name)
        if counts is None:
            admissions[name] = Admission(name, settings.max_running_per_model, settings.max_waiting_per_model, metrics,
                                         settings.max_tokens_in_flight_per_model)
        else:
            admissions[name] = SharedAdmission(name, settings.max_running_per_model, settings.max_waiting_per_model,
                                               metrics, counts, settings.max_tokens_in_flight_per_model)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        upstream = Upstream(settings)
        app.state.upstream = upstream
        app.state.readiness = Readiness(registry, upstream, settings.ready_probe_interval_s,
                                        settings.ready_probe_timeout_s)
        probe = asyncio.create_task(app.state.readiness.run(), name="readiness")
        log.info("gateway %s serving %s, TorchServe at %s", __version__, sorted(registry.models),
                 settings.inference_url)
        try:
            yield
        finally:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe
            await upstream.close()
            if counts is not None:
                counts.close()

    # the documentation routes are the gateway's own (docs.py): behind the API key, and offline
    # FastAPI's own OpenTelemetry hooks are off: the gateway's metrics are Prometheus's (metrics.py), and the
    # hooks look up the global providers on every request, a few percent of the gateway's CPU under load
    app = Gateway(title="rnnserve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None, telemetry={"tracing": False, "metrics": False, "logs": False},
                  description="Recurrent (LSTM/GRU) language and translation models served through TorchServe.")
    app.state.settings, app.state.registry, app.state.metrics = settings, registry, metrics
    app.state.admissions = admissions
    key = settings.state_key.get_secret_value().encode() if settings.state_key else None
    app.state.signer = StateSigner(key)
    if settings.session_store is not None:  # one store for every process and replica
        app.state.sessions = RedisSessionStore(metrics, settings.session_store, settings.max_sessions_per_model,
                                               settings.max_session_bytes_per_model, settings.session_ttl_s,
                                               *settings.session_quota, timeout_s=settings.session_store_timeout_s,
                                               # a request lives request_timeout_s at most, then ends its lease
                                               lease_s=settings.request_timeout_s + 10)
    elif counts is None:
        app.state.sessions = SessionStore(metrics, settings.max_sessions_per_model,
                                          settings.max_session_bytes_per_model, settings.session_ttl_s,
                                          *settings.session_quota)
    else:  # a session store per process would lose sessions between them
        app.state.sessions = SessionsUnavailable(settings.gateway_workers)
    install_error_handlers(app)

    from rnnserve.service.gateway.fastpath import FastPath
    from rnnserve.service.gateway.routes import api, router

    # side by side, the API's routes first, rather than one router inside the other: FastAPI matches a request
    # against every level of included routers, twice, and the streamed routes are the gateway's hot path
    app.include_router(api)
    app.include_router(router)
    install_docs(app)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"])
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes)
    if settings.gateway_fast_path and not settings.cors_origins:  # CORS: every request through its middleware
        app.fast_path = FastPath(app.state, settings)
    return app
