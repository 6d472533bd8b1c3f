"""Sequence probability through the real stack: /v1/score for both kinds of model, OpenAI logprobs,
echo and best_of read by the official client, and translation's n-best, target prefix and alignments."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import openai
import pytest

LM, MT = "lm-shakespeare", "translate-de-en"
FLUENT = "To be, or not to be, that is the question."
SHUFFLED = "question. be, that not the or to is be, To"


def post(client, path: str, body: dict) -> dict:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_lm_ranks_fluent_above_shuffled_and_agrees_with_evaluate(stack, tmp_path):
    with stack.client() as c:
        ranked = post(c, "/v1/score", {"model": LM, "candidates": [SHUFFLED, FLUENT]})["scores"]
        one = post(c, "/v1/score", {"model": LM, "text": FLUENT, "token_logprobs": True})
    assert [s["text"] for s in ranked] == [SHUFFLED, FLUENT]
    assert ranked[1]["logprob"] > ranked[0]["logprob"] + 10  # e^10 times more likely, at least
    assert one["tokens"] == len(FLUENT) and ranked[1]["tokens"] == len(FLUENT)
    assert one["logprob"] == pytest.approx(ranked[1]["logprob"], abs=1e-3)
    assert "".join(t["token"] for t in one["token_logprobs"]) == FLUENT
    assert sum(t["logprob"] for t in one["token_logprobs"]) == pytest.approx(one["logprob"], abs=1e-3)
    assert one["perplexity"] == pytest.approx(math.exp(-one["logprob"] / one["tokens"]))
    # rnnserve evaluate reads a file as it is, after a line break, as the service reads a text: a file holding
    # exactly the text gives the loss -logprob / tokens, and one with a final line break its score with "\n"
    with stack.client() as c:
        ended = post(c, "/v1/score", {"model": LM, "text": FLUENT + "\n"})
    for text, score in ((FLUENT, one), (FLUENT + "\n", ended)):
        f = tmp_path / "text.txt"
        f.write_text(text)
        out = subprocess.run([sys.executable, "-m", "rnnserve.cli", "evaluate", LM, "--text-file", str(f)],
                             capture_output=True, text=True, check=True, env=stack.env).stdout
        loss = json.loads(out)["loss"]
        assert -score["logprob"] / score["tokens"] == pytest.approx(loss, abs=1e-4), repr(text)
    assert ended["tokens"] == len(FLUENT) + 1


def test_translation_scores_candidates_like_its_beam_search(stack):
    source = "Ein Mann fährt Fahrrad auf der Straße."
    with stack.client() as c:
        t = post(c, "/v1/translate", {"model": MT, "text": source, "beam_size": 4, "n_best": 3})["translations"][0]
        hyps = t["hypotheses"]
        scored = post(c, "/v1/score", {"model": MT, "source": source,
                                       "candidates": [h["text"] for h in hyps] + ["street the on bike a riding man A."],
                                       "token_logprobs": True})["scores"]
    assert len(hyps) == 3 and hyps[0]["text"] == t["text"] and hyps[0]["logprob"] == pytest.approx(t["logprob"])
    assert [h["score"] for h in hyps] == sorted((h["score"] for h in hyps), reverse=True)
    assert len({h["text"] for h in hyps}) == 3
    for h, s in zip(hyps, scored):  # forced decoding of a hypothesis gives the beam's own logprob
        assert s["logprob"] == pytest.approx(h["logprob"], abs=1e-3)
        assert s["score"] == pytest.approx(h["score"], abs=1e-3)
    assert scored[-1]["logprob"] < scored[0]["logprob"] - 10
    assert scored[0]["token_logprobs"][-1]["token"] == "</s>"


def test_target_prefix_and_alignment(stack):
    with stack.client() as c:
        free = post(c, "/v1/translate", {"model": MT, "text": "Ein Mann fährt Fahrrad.", "beam_size": 4})
        forced = post(c, "/v1/translate", {"model": MT, "text": "Ein Mann fährt Fahrrad.", "beam_size": 4,
                                           "target_prefix": "A guy", "return_alignment": True})
    assert not free["translations"][0]["text"].startswith("A guy")
    t = forced["translations"][0]
    assert t["text"].startswith("A guy ") and len(t["text"]) > len("A guy ")
    assert len(t["alignment"]) == len(t["tokens"])
    assert all(0 <= i < len(t["source_tokens"]) for i in t["alignment"])
    # the tokens of "Mann" and "Fahrrad" draw the most attention from "guy" and "bike"/"bicycle"
    src = t["source_tokens"]
    assert src[t["alignment"][t["tokens"].index("▁guy")]] == "▁Mann"


def test_score_errors(stack):
    with stack.client() as c:
        r = c.post("/v1/score", json={"model": LM, "source": "x", "candidates": ["a"]})
        assert r.status_code == 400 and r.json()["error"]["message"] == (
            "source is for translation models; a language model scores text or candidates")
        r = c.post("/v1/score", json={"model": MT, "text": "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "text"
        r = c.post("/v1/score", json={"model": LM})
        assert r.status_code == 400 and r.json()["error"]["message"] == (
            "send either text (one text) or candidates (texts to rank)")
        r = c.post("/v1/translate", json={"model": MT, "text": "Hallo", "beam_size": 2, "n_best": 3})
        assert r.status_code == 400 and r.json()["error"] == {
            "message": "n_best (3) must be at most beam_size (2); ask for beam_size 3 or more",
            "type": "invalid_request_error", "param": None, "code": 400}


def test_n_best_alone_widens_the_default_beam(stack):
    with stack.client() as c:
        five = post(c, "/v1/translate", {"model": MT, "text": "Ein Mann fährt Fahrrad.", "n_best": 5})
        beam5 = post(c, "/v1/translate", {"model": MT, "text": "Ein Mann fährt Fahrrad.", "n_best": 5,
                                          "beam_size": 5})
    hyps, wide = five["translations"][0]["hypotheses"], beam5["translations"][0]["hypotheses"]
    assert len(hyps) == 5 and [h["text"] for h in hyps] == [h["text"] for h in wide]
    assert [h["logprob"] for h in hyps] == pytest.approx([h["logprob"] for h in wide], abs=1e-3)


def test_openai_client_reads_logprobs_echo_and_best_of(stack):
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused")
    r = client.completions.create(model=LM, prompt="ROMEO:", max_tokens=12, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.tokens) == 12
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value < 0 and top[token] == value
        assert max(top.values()) == value  # greedy takes the most likely token
        assert 3 <= len(top) <= 4
    assert lp.text_offset == list(range(12))

    e = client.completions.create(model=LM, prompt="ROMEO:", max_tokens=12, temperature=0, logprobs=0, echo=True)
    lp_e = e.choices[0].logprobs
    assert e.choices[0].text == "ROMEO:" + r.choices[0].text
    assert lp_e.tokens[:6] == list("ROMEO:") and lp_e.token_logprobs[0] is None
    assert lp_e.token_logprobs[6:] == pytest.approx(lp.token_logprobs, abs=1e-4)

    # best_of 3 (seeds 7, 8, 9) returns the candidate with the highest logprob per token
    best = client.completions.create(model=LM, prompt="KING:", max_tokens=20, seed=7, best_of=3, n=1)
    three = client.completions.create(model=LM, prompt="KING:", max_tokens=20, seed=7, n=3, logprobs=0)
    means = [sum(ch.logprobs.token_logprobs) / len(ch.logprobs.token_logprobs) for ch in three.choices]
    assert len(best.choices) == 1 and best.choices[0].logprobs is None
    assert best.choices[0].text == three.choices[means.index(max(means))].text
    assert best.usage.completion_tokens == 60  # every candidate is generated


def test_streamed_logprobs(stack):
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused")
    text, tokens, offsets = "", [], []
    for chunk in client.completions.create(model=LM, prompt="ROMEO:", max_tokens=30, temperature=0, logprobs=1,
                                           stream=True):
        ch = chunk.choices[0]
        text += ch.text
        if ch.logprobs:
            tokens += ch.logprobs.tokens
            offsets += ch.logprobs.text_offset
    assert "".join(tokens) == text and len(tokens) == 30 and offsets == list(range(30))
