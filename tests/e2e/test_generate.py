"""Generation through the real gateway and TorchServe, streamed and not."""
import json

import pytest

pytestmark = pytest.mark.e2e


def sse_events(resp) -> list:
    events = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return events


def test_non_streamed_generation_is_corpus_text_of_the_requested_length(stack, corpus_chars):
    with stack.client() as c:
        r = c.post("/v1/generate", json={"model": "lm-shakespeare", "prompt": "ROMEO:", "max_tokens": 120,
                                          "temperature": 0.8, "seed": 11})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "model", "text", "finish_reason", "usage"}
    assert body["id"] == r.headers["x-request-id"]
    assert body["model"] == "lm-shakespeare" and body["finish_reason"] == "length"
    assert len(body["text"]) == 120 and set(body["text"]) <= corpus_chars
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 120, "total_tokens": 126}
    # a trained model writes words: mostly letters and spaces
    letters = sum(ch.isalpha() or ch.isspace() for ch in body["text"])
    assert letters / len(body["text"]) > 0.8, body["text"]


def test_streamed_generation_matches_the_non_streamed_one_for_the_same_seed(stack, corpus_chars):
    req = {"model": "lm-shakespeare", "prompt": "JULIET:\n", "max_tokens": 200, "temperature": 0.9, "seed": 5}
    with stack.client() as c:
        whole = c.post("/v1/generate", json=req).json()
        with c.stream("POST", "/v1/generate", json={**req, "stream": True}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks, last = events[:-2], events[-2]
    # it really streamed: the first token left in an event of its own, ahead of the rest (a stream's first frame never
    # waits). How many events the other 199 take depends on the machine's speed: a fast engine sends bigger frames.
    texts = [e["text"] for e in events[:-1]]
    assert len(texts) >= 2 and 0 < len(texts[0]) < 200
    assert all(set(e) == {"id", "model", "text"} for e in chunks)
    assert last["finish_reason"] == "length"
    assert last["usage"] == {"prompt_tokens": 8, "completion_tokens": 200, "total_tokens": 208}
    text = "".join(e["text"] for e in events[:-1])
    assert text == whole["text"] and len(text) == 200 and set(text) <= corpus_chars


def test_same_seed_same_text_different_seed_different_text(stack):
    req = {"model": "lm-shakespeare", "prompt": "KING:", "max_tokens": 60, "seed": 123}
    with stack.client() as c:
        a = c.post("/v1/generate", json=req).json()["text"]
        b = c.post("/v1/generate", json=req).json()["text"]
        other = c.post("/v1/generate", json={**req, "seed": 124}).json()["text"]
    assert a == b and a != other


def test_health_readiness_and_models(stack):
    with stack.client() as c:
        assert c.get("/healthz").json() == {"status": "ok", "models": {}}
        docs = c.get("/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        assert set(c.get("/openapi.json").json()["paths"]) >= {"/v1/generate", "/v1/completions", "/v1/translate",
                                                                "/v1/score", "/v1/sessions/{session_id}"}
        assert c.get("/readyz").json() == {"status": "ready", "models": {
            "lm-shakespeare": "ready", "translate-de-en": "ready", "translate-fr-en": "ready"}}
        models = c.get("/v1/models").json()
    assert models["object"] == "list"
    cards = {m["id"]: {k: m[k] for k in ("object", "task", "cell", "vocab_size", "limits")} for m in models["data"]}
    assert cards["lm-shakespeare"] == {"object": "model", "task": "lm", "cell": "lstm", "vocab_size": 65, "limits": {
        "max_tokens": 2048, "max_prompt_chars": 8192, "max_prompts": 8, "max_n": 8}}
    tr = cards["translate-de-en"]
    assert (tr["task"], tr["cell"], tr["limits"]["max_beam_size"]) == ("translation", "gru", 8)
    assert tr["vocab_size"] == 8000
    languages = {m["id"]: m["languages"] for m in models["data"]}
    assert languages == {"lm-shakespeare": None, "translate-de-en": {"source": "de", "target": "en"},
                         "translate-fr-en": {"source": "fr", "target": "en"}}


def test_invalid_request_gets_one_error_shape_and_changes_nothing(stack):
    with stack.client() as c:
        r = c.post("/v1/generate", json={"model": "lm-shakespeare", "prompt": "a", "max_tokens": 0})
        assert r.status_code == 400
        assert r.json() == {"error": {"message": "max_tokens: Input should be greater than or equal to 1",
                                      "type": "invalid_request_error", "param": "max_tokens", "code": 400}}
        r = c.post("/v1/generate", json={"model": "nope", "prompt": "a"})
        assert r.status_code == 404
        assert r.json() == {"error": {"message": "model 'nope' does not exist; GET /v1/models lists the served models",
                                      "type": "not_found_error", "param": "model", "code": 404}}
        ok = c.post("/v1/generate", json={"model": "lm-shakespeare", "prompt": "a", "max_tokens": 3})
        assert ok.status_code == 200 and len(ok.json()["text"]) == 3


def test_a_json_body_without_a_json_content_type_is_told_to_send_one(stack):
    body = b'{"model": "lm-shakespeare", "prompt": "a", "max_tokens": 3}'
    with stack.client() as c:
        bare = c.post("/v1/generate", content=body)  # no Content-Type: not read, as a cross-site form could send it
        form = c.post("/v1/generate", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
        ok = c.post("/v1/generate", content=body, headers={"Content-Type": "application/json; charset=utf-8"})
    for r, said in ((bare, "has no Content-Type"), (form, "says 'application/x-www-form-urlencoded'")):
        assert r.status_code == 400 and r.json() == {"error": {
            "message": f"the request body is read as JSON only with `Content-Type: application/json`; this request "
                       f"{said}", "type": "invalid_request_error", "param": None, "code": 400}}
    assert ok.status_code == 200 and len(ok.json()["text"]) == 3



def test_requests_reaching_an_idle_model_share_one_prefill_and_keep_their_seeded_texts(stack):
    """A lone request to an idle model waits one of TorchServe's calls (the next brings nothing new) and is
    prefilled then, which the model log records; a burst of concurrent requests is gathered the same way, however
    its arrival times split it, and every stream's text is the one it gets alone."""
    import re
    import threading

    from tests.e2e.waits import metric, wait_for

    log_path = stack.run_dir / "logs" / "model_log.log"
    gathered = re.compile(r"one prefill for (\d+) requests gathered over (\d+) calls")
    bodies = [{"model": "lm-shakespeare", "prompt": p, "max_tokens": 24, "temperature": 0.9, "seed": i}
              for i, p in enumerate(["ROMEO:", "JULIET:\n", "", "To be", "KING:", "First Citizen:\n"])]
    with stack.client() as c:
        for _ in range(3):  # the gateway's readiness probe (one token every 5 s) may meet the request: try again
            wait_for(lambda: metric(c, "rnnserve_requests_running", model="lm-shakespeare") == 0, "an idle model")
            before = len(gathered.findall(log_path.read_text()))
            assert c.post("/v1/generate", json=bodies[0]).status_code == 200
            wait_for(lambda: len(gathered.findall(log_path.read_text())) > before, "the model log")
            if gathered.findall(log_path.read_text())[before:] == [("1", "2")]:
                break
        else:
            raise AssertionError("a lone request was never gathered alone")
        alone = [c.post("/v1/generate", json=b).json()["text"] for b in bodies]

    streamed: list[str] = [""] * len(bodies)

    def stream(i: int) -> None:
        with stack.client() as c, c.stream("POST", "/v1/generate", json={**bodies[i], "stream": True}) as r:
            streamed[i] = "".join(e["text"] for e in sse_events(r) if isinstance(e, dict))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(t) == 24 for t in alone) and streamed == alone
