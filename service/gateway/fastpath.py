"""The streamed generations, the gateway's hot path, as plain ASGI: `POST /v1/generate` and `/v1/completions`
with `"stream": true` that continue no text (no session, state or return_state).

Through FastAPI, each such request passes a dozen layers (routing, the exception and exit-stack middlewares,
dependency solving, StreamingResponse's task group) and each event a wrapper of the `send` in each of them;
here a request is read, checked and answered by the same functions the routes call (routes.py `open_*` and
`*_events`, generation.py `serve_events`), with nothing around them. The answers are the routes' own, byte for
byte. Anything this path does not take goes to the FastAPI app unchanged, its body replayed if already read:
a body that is not valid (its error message is FastAPI's validation error, errors.py), a missing or wrong API
key, a body without a Content-Length or past the size limit, anything but JSON. Off with
RNNSERVE_GATEWAY_FAST_PATH=false; never used with CORS configured (its middleware sees every request).
"""
from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from pydantic import BaseModel, ValidationError

from rnnserve.service.gateway.app import request_id_of, request_id_var
from rnnserve.service.gateway.deps import api_key_owner
from rnnserve.service.gateway.errors import APIError, error_response
from rnnserve.service.gateway.generation import SSE_HEADERS, serve_events
from rnnserve.service.gateway.protocol import CompletionRequest, GenerateRequest
from rnnserve.service.gateway.routes import (Opened, completion_events, generate_events, open_completions,
                                             open_generate)
from rnnserve.service.settings import Settings

log = logging.getLogger(__name__)

# what sends a request elsewhere, read from its body before it is validated
CONTINUES = ("session", "state", "return_state")


@dataclass(frozen=True)
class FastRoute:
    request: type[BaseModel]
    open: Callable[..., Awaitable[Opened]]
    events: Callable[..., AsyncIterator[bytes]]


ROUTES = {"/v1/generate": FastRoute(GenerateRequest, open_generate, generate_events),
          "/v1/completions": FastRoute(CompletionRequest, open_completions, completion_events)}


class FastPath:
    routes = ROUTES

    def __init__(self, state, settings: Settings) -> None:
        self.state = state  # the app's state: registry, admissions, metrics, and the upstream client once started
        self.keys = settings.api_keys
        self.max_body = settings.max_body_bytes

    async def __call__(self, scope, receive, send, app) -> None:
        """Answer the request, or hand it to `app` (the FastAPI app) as it came."""
        content_length = content_type = authorization = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                content_length, seen = value, content_length
            elif name == b"content-type":
                content_type, seen = value, content_type
            elif name == b"authorization":
                authorization, seen = value, authorization
            else:
                continue
            if seen is not None:  # the same header twice: whichever FastAPI reads, it decides
                return await app(scope, receive, send)
        if (content_length is None or not content_length.isdigit() or int(content_length) > self.max_body
                or content_type is None or not _is_json(content_type)):
            return await app(scope, receive, send)
        if self.keys:
            try:
                api_key_owner(self.keys, authorization.decode("latin-1") if authorization else "")
            except APIError:
                return await app(scope, receive, send)

        messages, chunks, more = [], [], True
        while more:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return await app(scope, _replay(messages, receive), send)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        route = self.routes[scope["path"]]
        req = _request(route, b"".join(chunks), self.max_body)
        if req is None:
            return await app(scope, _replay(messages, receive), send)
        await self._answer(scope, receive, send, route, req)

    async def _answer(self, scope, receive, send, route: FastRoute, req: BaseModel) -> None:
        rid = request_id_of(dict(scope["headers"]))
        token = request_id_var.set(rid)
        scope.setdefault("state", {})["request_id"] = rid
        id_header = (b"x-request-id", rid.encode())
        try:
            try:
                opened = await route.open(self.state, req, rid, None)
            except APIError as err:
                response = error_response(err)
                await send({"type": "http.response.start", "status": response.status_code,
                            "headers": [*response.raw_headers, id_header]})
                await send({"type": "http.response.body", "body": response.body})
                return
            except Exception:
                # as the app's last-resort handler answers (errors.py), outside the request-id middleware
                log.exception("unhandled error")
                await error_response(APIError(500, "internal server error", "internal_error"))(scope, receive, send)
                raise
            await serve_events(scope, receive, send, [*SSE_HEADERS, id_header], route.events(req, opened),
                               opened.ctx.deadline)
        finally:
            request_id_var.reset(token)


def _is_json(content_type: bytes) -> bool:
    """Only the plain JSON type: any other goes to FastAPI, which decides how to read it."""
    return content_type.split(b";", 1)[0].strip().lower() == b"application/json"


def _request(route: FastRoute, body: bytes, max_body: int) -> BaseModel | None:
    """The validated request when this path takes it, else None."""
    if len(body) > max_body:
        return None
    try:
        data = json.loads(body)  # as FastAPI reads a JSON body
    except (ValueError, RecursionError):
        return None
    if type(data) is not dict or data.get("stream") is not True or any(k in data for k in CONTINUES):
        return None
    try:
        return route.request.model_validate(data)
    except ValidationError:
        return None


def _replay(messages: list[dict], receive):
    """`receive` that gives the messages already read first."""
    pending = deque(messages)

    async def replayed():
        return pending.popleft() if pending else await receive()
    return replayed
