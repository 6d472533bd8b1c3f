"""The streamed requests' fast path (service/gateway/fastpath.py) with a fake upstream: which requests it takes
(the others reach FastAPI untouched), the answer it makes of the upstream's frames, and how a stream ends when
its client leaves or stops reading. Its answers against the FastAPI routes' through the real stack:
tests/e2e/test_fast_path.py."""
from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI

from rnnserve.models.folder import copy_model_folder
from rnnserve.service.gateway.app import create_app
from rnnserve.service.gateway.connections import ABORT, WRITE_PAUSED
from rnnserve.service.settings import Settings
from rnnserve.service.stack import free_ports

LM = "lm-shakespeare"
HANG_S = 60  # only a hang reaches it
FRAMES = [{"text": "ab", "batch": 1}, {"text": "c", "finish_reason": "length",
                                       "usage": {"prompt_tokens": 2, "completion_tokens": 3}}]


class FakeUpstream:
    """Yields `frames`, then (with `hang`) waits for ever; records whether each stream was closed."""

    def __init__(self, frames: list[dict], hang: bool = False) -> None:
        self.frames_, self.hang = frames, hang
        self.closed: list[bool] = []

    async def frames(self, model: str, body: dict):
        self.closed.append(False)
        i = len(self.closed) - 1
        try:
            for frame in self.frames_:
                yield frame
            if self.hang:
                await asyncio.Event().wait()
        finally:
            self.closed[i] = True


@pytest.fixture(scope="module")
def settings(tiny_lm_folder, tmp_path_factory) -> Settings:
    root = tmp_path_factory.mktemp("fast")
    copy_model_folder(tiny_lm_folder, root / "models" / LM)
    (root / "store").mkdir()
    (root / "store" / f"{LM}.mar").touch()
    ports = free_ports(6)
    return Settings(port=ports[0], ts_inference_port=ports[1], ts_management_port=ports[2],
                    ts_metrics_port=ports[3], ts_grpc_inference_port=ports[4], ts_grpc_management_port=ports[5],
                    models_dir=root / "models", model_store=root / "store", run_dir=root / "run",
                    ts_token_auth=False, max_body_bytes=4096, request_timeout_s=0.5)


def app_with(settings: Settings, upstream: FakeUpstream, **changes) -> FastAPI:
    app = create_app(settings.model_copy(update=changes))
    app.state.upstream = upstream
    return app


async def call(app, path: str, body: dict, headers: list | None = None, receive=None, on_send=None,
               extensions: dict | None = None) -> tuple[int, list, bytes]:
    """One request straight through the app's ASGI interface: status, headers and body (every message the app
    sent, whether or not `on_send`, the client's side of a write, returned)."""
    raw = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
                         (b"x-request-id", b"r1"), *(headers or [])], "extensions": extensions or {}}
    sent = [{"type": "http.request", "body": raw, "more_body": False}]
    out: list[dict] = []
    gone = asyncio.Event()

    async def plain_receive():
        if sent:
            return sent.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def record(message):
        out.append(message)
        if on_send is not None:
            await on_send(message)
    await app(scope, receive or plain_receive, record)
    start = next(m for m in out if m["type"] == "http.response.start")
    body_bytes = b"".join(m.get("body", b"") for m in out if m["type"] == "http.response.body")
    return start["status"], start["headers"], body_bytes


async def ends(request):
    """The request's answer, once it ended by itself (a bound that only a hang reaches)."""
    task = asyncio.ensure_future(request)
    done, _ = await asyncio.wait({task}, timeout=HANG_S)
    assert done, "the request did not end"
    return task.result()


@pytest.fixture
def fastapi_calls(monkeypatch) -> list[str]:
    """The paths of the HTTP requests that reached FastAPI."""
    seen: list[str] = []
    original = FastAPI.__call__

    async def spy(self, scope, receive, send):
        if scope["type"] == "http":
            seen.append(scope["path"])
        await original(self, scope, receive, send)
    monkeypatch.setattr(FastAPI, "__call__", spy)
    return seen


def test_a_streamed_generation_takes_the_fast_path_with_the_routes_answer(settings, fastapi_calls):
    fast = app_with(settings, FakeUpstream(FRAMES))
    plain = app_with(settings, FakeUpstream(FRAMES), gateway_fast_path=False)
    body = {"model": LM, "prompt": "xy", "max_tokens": 3, "stream": True}
    got = asyncio.run(call(fast, "/v1/generate", body))
    assert fastapi_calls == []
    assert got == asyncio.run(call(plain, "/v1/generate", body))
    assert fastapi_calls == ["/v1/generate"]
    status, headers, raw = got
    assert status == 200 and headers == [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"),
                                         (b"content-type", b"text/event-stream; charset=utf-8"),
                                         (b"x-request-id", b"r1")]
    assert raw == (b'data: {"id":"r1","model":"lm-shakespeare","text":"ab"}\n\n'
                   b'data: {"id":"r1","model":"lm-shakespeare","text":"c","finish_reason":"length",'
                   b'"usage":{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5}}\n\ndata: [DONE]\n\n')
    assert fast.state.admissions[LM].running == 0 and fast.state.upstream.closed == [True]


@pytest.mark.parametrize("path, body", [
    ("/v1/generate", {"model": LM, "stream": False}),
    ("/v1/generate", {"model": LM}),
    ("/v1/generate", {"model": LM, "stream": True, "session": "s1"}),
    ("/v1/generate", {"model": LM, "stream": True, "return_state": False}),
    ("/v1/completions", {"model": LM, "stream": True, "state": "x"}),
    ("/v1/generate", {"model": LM, "stream": True, "max_tokens": 0}),
    ("/v1/translate", {"model": LM, "text": "a", "stream": True}),
])
def test_everything_else_goes_to_fastapi(settings, fastapi_calls, path, body):
    asyncio.run(call(app_with(settings, FakeUpstream(FRAMES)), path, body))
    assert fastapi_calls == [path]


def test_no_fast_path_when_off_or_with_cors(settings):
    assert app_with(settings, FakeUpstream(FRAMES)).fast_path is not None
    assert app_with(settings, FakeUpstream(FRAMES), gateway_fast_path=False).fast_path is None
    assert app_with(settings, FakeUpstream(FRAMES), cors_origins=["https://a.example"]).fast_path is None


def test_a_client_that_leaves_frees_the_slot_and_closes_the_upstream_stream(settings):
    upstream = FakeUpstream(FRAMES[:1], hang=True)  # one frame, then nothing: the stream waits upstream
    app = app_with(settings, upstream, request_timeout_s=600)
    admission = app.state.admissions[LM]

    async def run() -> tuple[int, list, bytes]:
        delivered = asyncio.Event()
        body = json.dumps({"model": LM, "stream": True}).encode()
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if messages:
                return messages.pop(0)
            await delivered.wait()  # the client leaves once the first event reached it
            return {"type": "http.disconnect"}

        async def send(message):
            if message.get("body"):
                assert admission.running == 1
                delivered.set()
        return await call(app, "/v1/generate", {"model": LM, "stream": True}, receive=receive, on_send=send)
    status, _, raw = asyncio.run(ends(run()))
    assert status == 200 and raw == b'data: {"id":"r1","model":"lm-shakespeare","text":"ab"}\n\n'
    assert admission.running == 0 and upstream.closed == [True]
    assert app.state.metrics.stream(LM).cancelled._value.get() == 1


def test_a_write_blocked_past_the_deadline_drops_the_connection(settings):
    upstream = FakeUpstream(FRAMES[:1], hang=True)
    app = app_with(settings, upstream)  # request_timeout_s 0.5
    aborted = []

    async def run() -> tuple[int, list, bytes]:
        async def send(message):
            if message["type"] == "http.response.body":
                await asyncio.Event().wait()  # a client that reads nothing: the write never ends

        return await call(app, "/v1/generate", {"model": LM, "stream": True}, on_send=send,
                          extensions={WRITE_PAUSED: lambda: True, ABORT: lambda: aborted.append(True)})
    assert asyncio.run(ends(run()))[0] == 200
    assert aborted == [True] and upstream.closed == [True]
    assert app.state.admissions[LM].running == 0
    assert app.state.metrics.requests.labels(model=LM, route="generate", outcome="timeout")._value.get() == 1


class StaleClockLoop(asyncio.SelectorEventLoop):
    """A loop whose clock lags time.monotonic() by 5 ms inside tasks, as uvloop's does (libuv's clock, read once
    per loop turn): a timer that a task sets for a deadline taken from time.monotonic() fires before it."""

    def time(self) -> float:
        now = super().time()
        return now - 0.005 if asyncio.current_task(self) is not None else now


def test_a_write_blocked_past_the_deadline_counts_as_timed_out_on_a_stale_clock(settings):
    upstream = FakeUpstream(FRAMES[:1], hang=True)
    app = app_with(settings, upstream)  # request_timeout_s 0.5

    async def run() -> tuple[int, list, bytes]:
        async def send(message):
            if message["type"] == "http.response.body":
                await asyncio.Event().wait()

        return await call(app, "/v1/generate", {"model": LM, "stream": True}, on_send=send,
                          extensions={WRITE_PAUSED: lambda: True, ABORT: lambda: None})
    with asyncio.Runner(loop_factory=StaleClockLoop) as runner:
        assert runner.run(ends(run()))[0] == 200
    outcomes = {o: app.state.metrics.requests.labels(model=LM, route="generate", outcome=o)._value.get()
                for o in ("timeout", "cancelled")}
    assert outcomes == {"timeout": 1, "cancelled": 0}


def test_the_deadline_ends_a_stream_waiting_upstream_with_an_error_event(settings):
    upstream = FakeUpstream(FRAMES[:1], hang=True)  # then nothing: only the deadline (0.5 s) ends it
    app = app_with(settings, upstream)
    status, _, raw = asyncio.run(ends(call(app, "/v1/generate", {"model": LM, "stream": True})))
    assert status == 200 and raw == (
        b'data: {"id":"r1","model":"lm-shakespeare","text":"ab"}\n\n'
        b'data: {"error":{"message":"the request did not finish before its deadline","type":"timeout_error",'
        b'"param":null,"code":504}}\n\ndata: [DONE]\n\n')
    assert upstream.closed == [True] and app.state.admissions[LM].running == 0
    assert app.state.metrics.requests.labels(model=LM, route="generate", outcome="timeout")._value.get() == 1
