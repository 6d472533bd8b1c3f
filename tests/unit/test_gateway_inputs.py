"""The gateway's answers to bad and hostile input, with TorchServe down (nothing listens on its port):
validation never reaches upstream, and upstream being down is a fast 503, never a 500."""
import time

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rnnserve.models.folder import copy_model_folder
from rnnserve.service.gateway.app import create_app
from rnnserve.service.settings import Settings
from rnnserve.service.stack import free_ports

ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def client(tiny_lm_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("gw")
    copy_model_folder(tiny_lm_folder, root / "models" / "lm-shakespeare")
    (root / "store").mkdir()
    (root / "store" / "lm-shakespeare.mar").touch()
    ports = free_ports(6)
    settings = Settings(port=ports[0], ts_inference_port=ports[1], ts_management_port=ports[2],
                        ts_metrics_port=ports[3], ts_grpc_inference_port=ports[4], ts_grpc_management_port=ports[5],
                        models_dir=root / "models", model_store=root / "store", run_dir=root / "run",
                        ts_token_auth=False, max_body_bytes=4096, ready_probe_interval_s=0.2)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def assert_error(r, status):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS
    assert "Traceback" not in r.text


json_values = st.recursive(st.none() | st.booleans() | st.integers()
                           | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
                           lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children,
                                                                                            max_size=4),
                           max_leaves=8)
FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_k", "top_p", "stop", "seed", "stream", "n"]


@given(body=st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), json_values, max_size=6))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_json_body_gets_a_4xx_or_a_fast_503_never_a_500(client, body):
    for path in ("/v1/generate", "/v1/completions", "/v1/translate"):
        r = client.post(path, json=body)
        assert r.status_code in (400, 404, 413, 503), (path, body, r.text)
        assert set(r.json()["error"]) == ERROR_KEYS


@given(text=st.text())
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_unicode_prompt_is_accepted_or_bounded(client, text):
    r = client.post("/v1/generate", json={"model": "lm-shakespeare", "prompt": text, "max_tokens": 1})
    # valid requests go upstream, which is down: 503; too long for the body limit: 413
    assert r.status_code in (503, 413, 400), r.text


@pytest.mark.parametrize("raw,param", [
    (b'{"model": "lm-shakespeare", "temperature": NaN}', "temperature"),
    (b'{"model": "lm-shakespeare", "top_p": Infinity}', "top_p"),
    (b'{"model": "lm-shakespeare", "max_tokens": 100000000000000000000000000000}', "max_tokens"),
    (b'{"model": "lm-shakespeare", "seed": -1}', "seed"),
    (b'{"model": "lm-shakespeare", "max_tokens": "12"}', "max_tokens"),
    (b'{"model": 5}', "model"),
])
def test_hostile_numbers_and_types(client, raw, param):
    r = client.post("/v1/generate", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400)
    assert r.json()["error"]["param"] == param


def test_malformed_bodies(client):
    for raw in (b"{", b"[1, 2]", b"\xff\xfe", b"null", b""):
        assert_error(client.post("/v1/generate", content=raw, headers={"content-type": "application/json"}), 400)
    r = client.post("/v1/generate", content=b'{"model": "' + b"a" * 5000 + b'"}',
                    headers={"content-type": "application/json"})
    assert_error(r, 413)
    assert r.json()["error"]["message"] == "request body is larger than 4096 bytes"


def test_unknown_routes_and_methods_use_the_error_shape(client):
    assert_error(client.get("/nope"), 404)
    assert_error(client.get("/v1/generate"), 405)


def test_torchserve_down_fails_fast_with_503_and_readyz_says_why(client):
    t0 = time.monotonic()
    r = client.post("/v1/generate", json={"model": "lm-shakespeare", "prompt": "a", "max_tokens": 3})
    assert time.monotonic() - t0 < 30  # a refused connection answers at once, not at the 120 s request deadline
    assert_error(r, 503)
    assert r.json()["error"] == {"message": "model server is not reachable", "type": "unavailable_error",
                                 "param": None, "code": 503}
    r = client.post("/v1/generate", json={"model": "lm-shakespeare", "prompt": "a", "stream": True})
    assert_error(r, 503)  # a stream that cannot start is a plain error, not an event stream
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"status": "not ready",
                            "models": {"lm-shakespeare": "not ready: model server is not reachable"}}


def test_request_id_is_echoed_or_generated(client):
    r = client.get("/healthz", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = client.get("/healthz", headers={"X-Request-Id": "bad id\nwith newline"})
    assert len(r.headers["x-request-id"]) == 32  # not echoed: replaced by a fresh id


@given(st.text(max_size=20), st.text(max_size=20), st.text(max_size=40), st.integers(0, 2**31), st.integers(0, 63))
@settings(max_examples=50)
def test_per_frame_events_are_the_models_dumps(rid, model, text, created, index):
    """The streaming hot path builds events as dicts; they must be exactly what the documented models give."""
    from rnnserve.service.gateway.protocol import (CONTINUATION, CompletionChoice, CompletionResponse, GenerateChunk,
                                                   TranslateChunk)
    assert GenerateChunk.text_event(rid, model, text) == GenerateChunk(id=rid, model=model, text=text).model_dump(
        exclude_none=True)
    assert TranslateChunk.text_event(rid, model, text) == TranslateChunk(id=rid, model=model, text=text).model_dump(
        exclude_none=True)
    assert CompletionResponse.text_event(rid, created, model, index, text) == CompletionResponse(
        id=rid, created=created, model=model, choices=[CompletionChoice(text=text, index=index)]).model_dump(
        exclude=CONTINUATION)


def test_a_chunked_body_over_the_limit_is_413_like_a_declared_one(client):
    def chunks():
        for _ in range(10):
            yield b" " * 1000  # no Content-Length: the limit is met while the body is read

    r = client.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413)
    assert r.json()["error"]["message"] == "request body is larger than 4096 bytes"


@pytest.mark.parametrize("raw,message", [
    (b'{"model": "lm" "prompt": "a"}', "expecting ',' delimiter at line 1, column 16"),
    (b'{\n  "model": "lm",\n  "prompt": }', "expecting value at line 3, column 13"),
    (b"{", "expecting property name enclosed in double quotes at line 1, column 2"),
])
def test_a_json_syntax_error_says_where_in_words(client, raw, message):
    r = client.post("/v1/generate", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400)
    assert r.json()["error"] == {"message": f"request body is not valid JSON: {message}",
                                 "type": "invalid_request_error", "param": None, "code": 400}


def test_docs_are_served_from_the_package(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "/docs/assets/swagger-ui-bundle.js" in page.text
    assert "cdn" not in page.text.lower() and "https://" not in page.text.split("<body>")[1]
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        r = client.get(f"/docs/assets/{asset}")
        assert r.status_code == 200 and len(r.content) > 100_000, asset
    redoc = client.get("/redoc")
    assert redoc.status_code == 200 and "/docs/assets/redoc.standalone.js" in redoc.text
    assert "fonts.googleapis" not in redoc.text
    assert client.get("/openapi.json").json()["info"]["title"] == "rnnserve"
