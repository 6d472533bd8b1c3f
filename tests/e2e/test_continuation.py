"""Sessions and returned states through the real stack: continuing is exact, bad states are refused in
the one error shape and change nothing, sessions are listed, forked, deleted and counted in metrics."""
from __future__ import annotations


import numpy as np

from rnnserve.engine.state import HEADER
from rnnserve.service.gateway.states import StateSigner, _b64, _unb64
from tests.e2e.conftest import STATE_KEY
from tests.e2e.waits import metric

LM = "lm-shakespeare"
GREEDY = {"model": LM, "temperature": 0}


def generate(client, **body) -> dict:
    r = client.post("/v1/generate", json={**GREEDY, **body})
    assert r.status_code == 200, r.text
    return r.json()


def error(r, status: int, message: str, param: str | None = "state") -> None:
    assert r.status_code == status, r.text
    assert r.json() == {"error": {"message": message, "type": "invalid_request_error", "param": param,
                                  "code": status}}


def test_session_continues_exactly(stack):
    with stack.client() as c:
        whole = generate(c, prompt="ROMEO:", max_tokens=120)["text"]
        first = generate(c, prompt="ROMEO:", max_tokens=70, session="exact")
        assert first["session"] == "exact" and "state" not in first
        second = generate(c, prompt="", max_tokens=50, session="exact")
        assert first["text"] + second["text"] == whole
        info = c.get("/v1/sessions/exact").json()
        # "ROMEO:" (6) and 120 generated characters, the last one pending: 125 read
        assert info["model"] == LM and info["tokens"] == 125 and info["bytes"] > 8192
        assert [s["id"] for s in c.get("/v1/sessions").json()["data"]] == ["exact"]
        assert c.delete("/v1/sessions/exact").status_code == 204
        r = c.get("/v1/sessions/exact")
        assert r.status_code == 404 and r.json()["error"]["message"] == "session 'exact' does not exist (or expired)"


def test_session_prompt_continues_the_conversation(stack):
    """A prompt sent into a session is read after the session's text: the answer depends on that text,
    and the session grows by the prompt and the answer. (Greedy, on the shipped model: these histories
    and this turn give three different answers.)"""
    turn = " and"
    with stack.client() as c:
        generate(c, prompt="JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?", max_tokens=40, session="talk")
        generate(c, prompt="First Citizen:\nWe are accounted poor citizens", max_tokens=40, session="other")
        before = c.get("/v1/sessions/talk").json()["tokens"]
        continued = generate(c, prompt=turn, max_tokens=30, session="talk")["text"]
        elsewhere = generate(c, prompt=turn, max_tokens=30, session="other")["text"]
        fresh = generate(c, prompt=turn, max_tokens=30)["text"]
        assert c.get("/v1/sessions/talk").json()["tokens"] == before + len(turn) + 30
        assert len({continued, elsewhere, fresh}) == 3  # the same prompt after three different histories
        for sid in ("talk", "other"):
            c.delete(f"/v1/sessions/{sid}")


def sessions_gauge(c) -> float:
    return metric(c, "rnnserve_sessions", model=LM)


def test_fork_goes_its_own_way(stack):
    with stack.client() as c:
        generate(c, prompt="KING:", max_tokens=20, session="trunk")
        r = c.post("/v1/sessions/trunk/fork", json={"id": "branch"})
        assert r.status_code == 201 and r.json()["tokens"] == c.get("/v1/sessions/trunk").json()["tokens"]
        a = generate(c, prompt=" Hark", max_tokens=20, session="trunk")["text"]
        b = generate(c, prompt=" Hark", max_tokens=20, session="branch")["text"]
        assert a == b  # same state, same prompt, greedy
        r = c.post("/v1/sessions/trunk/fork", json={"id": "branch"})
        assert r.status_code == 409 and r.json()["error"]["message"] == "session 'branch' already exists"
        held = sessions_gauge(c)
        for sid in ("trunk", "branch"):
            assert c.delete(f"/v1/sessions/{sid}").status_code == 204
        assert sessions_gauge(c) == held - 2


def test_returned_state_continues_exactly(stack):
    with stack.client() as c:
        whole = generate(c, prompt="ROMEO:", max_tokens=120)["text"]
        first = generate(c, prompt="ROMEO:", max_tokens=70, return_state=True)
        assert first["state"].startswith("rs2.")
        second = generate(c, prompt="", max_tokens=50, state=first["state"], return_state=True)
        assert first["text"] + second["text"] == whole
        # fp16, no text: the same few kilobytes whatever the length of the text
        assert len(second["state"]) == len(first["state"]) < 6000


def test_returned_state_streams_and_openai_route(stack):
    import openai

    with stack.client() as c:
        whole = generate(c, prompt="ROMEO:", max_tokens=60)["text"]
        events = []
        with c.stream("POST", "/v1/generate", json={**GREEDY, "prompt": "ROMEO:", "max_tokens": 30,
                                                       "stream": True, "return_state": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    events.append(__import__("json").loads(line[6:]))
        text, state = "".join(e["text"] for e in events), events[-1]["state"]
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused")
    rest = client.completions.create(model=LM, prompt="", max_tokens=30, temperature=0, extra_body={"state": state})
    assert text + rest.choices[0].text == whole


MISMATCH = "state's signature does not match: it was altered, signed with another key, or issued to another API key"


def sign(model: str, blob: bytes) -> str:
    return StateSigner(STATE_KEY.encode()).sign(model, blob)


def test_bad_states_are_refused_and_change_nothing(stack):
    with stack.client() as c:
        good = generate(c, prompt="ROMEO:", max_tokens=10, return_state=True)["state"]
        _, model, blob, mac = good.split(".")
        raw = _unb64(blob)
        flipped = bytearray(raw)
        flipped[-1] ^= 1
        other_weights = raw[: HEADER.size - 16] + bytes(16) + raw[HEADER.size:]
        cases = [
            ("not a state", "state is not a state this server issued"),
            (".".join(["rs2", model, _b64(raw[:-6]), mac]), MISMATCH),
            (".".join(["rs2", model, _b64(bytes(flipped)), mac]), MISMATCH),
            (".".join(["rs2", model, blob[:8] + "~" + blob[8:], mac]), "state is not a state this server issued"),
            (sign("translate-de-en", raw), "state was issued for model 'translate-de-en', not 'lm-shakespeare'"),
        ]
        for state, message in cases:
            error(c.post("/v1/generate", json={**GREEDY, "state": state}), 400, message)
        # signed with the right key, but not a state of this model: the handler checks the bytes
        handler_cases = [
            (raw[:20], "state is truncated"),
            (raw[:-2], "state has 4094 bytes of layers; this model's have 4096"),
            (raw + bytes(2), "state has 4098 bytes of layers; this model's have 4096"),
            (other_weights, "state was made by other weights than this model's"),
        ]
        for blob_, message in handler_cases:
            error(c.post("/v1/generate", json={**GREEDY, "state": sign(LM, blob_)}), 400, message, None)
        r = c.post("/v1/generate", json={**GREEDY, "state": "x" * 200_000})
        assert r.status_code == 400 and r.json()["error"]["param"] == "state"
        error(c.post("/v1/generate", json={**GREEDY, "state": good, "session": "s"}), 400,
              "send either session or state, not both", None)
        # nothing changed: the good state still continues
        assert generate(c, prompt="", max_tokens=5, state=good)["text"]


def test_a_state_past_float16s_range_is_signed_in_float32_and_accepted_back(stack):
    """A long text can grow an LSTM cell past float16's largest number (65,504). Such a state, made here
    from a real one by setting every cell to 1e30, continues; the state the server signs after it still
    holds cells past that range, and is written in float32 so that the server accepts it back."""
    with stack.client() as c:
        real = _unb64(generate(c, prompt="ROMEO:", max_tokens=5, return_state=True)["state"].split(".")[2])
        header = bytearray(real[:HEADER.size])
        values = np.frombuffer(real, dtype=np.float16, offset=HEADER.size).astype(np.float32).reshape(2, 2, -1)
        values[:, 1, :] = 1e30  # layer by layer: h, then c
        header[5] = 2  # float32
        big = sign(LM, bytes(header) + values.tobytes())
        out = generate(c, prompt="A", max_tokens=3, state=big, return_state=True)["state"]
        blob = _unb64(out.split(".")[2])
        assert blob[5] == 2  # float32: float16 cannot hold these cells
        cells = np.frombuffer(blob, dtype=np.float32, offset=HEADER.size).reshape(2, 2, -1)[:, 1, :]
        assert np.abs(cells).max() > 65_504 and np.isfinite(cells).all()
        assert generate(c, prompt="B", max_tokens=3, state=out, return_state=True)["state"]


def test_session_refuses_other_model_and_bad_ids(stack):
    with stack.client() as c:
        generate(c, prompt="A", max_tokens=3, session="mine")
        r = c.post("/v1/translate", json={"model": "translate-de-en", "text": "Hallo", "session": "mine"})
        assert r.status_code == 400  # translation has no sessions: an unknown field
        r = c.get("/v1/sessions/bad%20id")
        assert r.status_code == 400
        c.delete("/v1/sessions/mine")
