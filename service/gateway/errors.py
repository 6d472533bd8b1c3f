"""One error shape for every failure: {"error": {"message", "type", "param", "code"}}.

Exception handlers are registered once in the app factory; no route formats an error itself, and
no stack trace ever reaches a client (it goes to the log with the request id).
"""
from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rnnserve.service.gateway.protocol import ErrorDetail, ErrorResponse

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error answer; its "code" is always its HTTP status (an int), as clients read it."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.code = status
        self.headers = headers

    def body(self) -> dict:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param,
                                               code=self.code)).model_dump()


def invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param)


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


_TYPE_ERRORS = {"string_type", "list_type", "int_type", "float_type", "bool_type", "dict_type", "none_required"}
_UNION_TAG = re.compile(r"[\[\]-]|^(str|int|float|bool|list|dict|none)$")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable sentence per bad field. Errors of a union's members (str | list[str]) are merged:
    the type mismatches of the members the value was not meant for are dropped."""
    by_param: dict[str | None, list[dict]] = {}
    errors = exc.errors()
    if len(errors) == 1 and errors[0].get("type") == "json_invalid":
        return _json_syntax(errors[0], exc.body), None
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body" and not (isinstance(x, str) and _UNION_TAG.search(x))]
        by_param.setdefault(".".join(loc) or None, []).append(e)
    parts = []
    for param, errs in list(by_param.items()):
        if param and all(e.get("type") in _TYPE_ERRORS for e in errs) and any(
                other and other.startswith(param + ".") for other in by_param):
            del by_param[param]  # the list member is the one meant: its item errors say what is wrong
            continue
        real = [e for e in errs if e.get("type") not in _TYPE_ERRORS] or errs
        if len(real) > 1 and all(e.get("type") in _TYPE_ERRORS for e in real):
            msgs = ["has the wrong type: give " + " or ".join(
                sorted({e["msg"].removeprefix("Input should be ").removeprefix("a valid ") for e in real}))]
        else:
            msgs = [_message(e) for e in real]
        parts += [f"{param}: {m}" if param else m for m in dict.fromkeys(msgs)]
    return "; ".join(parts) or "invalid request", next(iter(by_param), None)


def _json_syntax(e: dict, doc: object) -> str:
    """Where a body stops being JSON, as a person reads it: "expecting ',' delimiter at line 1, column 10"."""
    reason = str((e.get("ctx") or {}).get("error") or "syntax error")
    reason = reason[:1].lower() + reason[1:]
    loc = e.get("loc") or ()
    pos = loc[-1] if loc and isinstance(loc[-1], int) else None
    if pos is None or not isinstance(doc, str | bytes):
        return f"request body is not valid JSON: {reason}"
    text = doc if isinstance(doc, str) else doc.decode("utf-8", "replace")
    line = text.count("\n", 0, pos) + 1
    column = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return f"request body is not valid JSON: {reason} at line {line}, column {column}"


def _message(e: dict) -> str:
    kind = e.get("type")
    if kind == "extra_forbidden":
        return "unknown field; remove it"
    if kind == "json_invalid":
        return "request body is not valid JSON"
    if kind == "model_attributes_type":
        return "request body must be a JSON object"
    return e.get("msg", "invalid value").removeprefix("Value error, ")


def _is_json(content_type: str) -> bool:
    """application/json or application/<something>+json, parameters aside (as FastAPI reads it)."""
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error", 429: "overloaded_error",
                503: "unavailable_error", 504: "timeout_error"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type")
        body_not_read = any(e.get("type") == "model_attributes_type" and tuple(e.get("loc", ())) == ("body",)
                            for e in exc.errors())
        if body_not_read and not _is_json(content_type or ""):
            # FastAPI reads a body as JSON only when the request says it is JSON: a body without a Content-Type
            # could be a cross-site form (FastAPI's strict_content_type), and curl -d sends a form's type
            said = f"says {content_type!r}" if content_type else "has no Content-Type"
            return error_response(invalid("the request body is read as JSON only with `Content-Type: "
                                          f"application/json`; this request {said}"))
        message, param = _validation_message(exc)
        return error_response(invalid(message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return error_response(APIError(exc.status_code, message, STATUS_TYPES.get(exc.status_code, "api_error"),
                                       headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(APIError(500, "internal server error", "internal_error"))
