"""Translation through the real gateway and TorchServe."""
import json

import pytest

from rnnserve.models.folder import load_translation
from rnnserve.paths import MODELS_DIR

pytestmark = pytest.mark.e2e

M = "translate-de-en"


def test_translates_a_list_with_beam_search(stack):
    with stack.client() as c:
        r = c.post("/v1/translate", json={"model": M, "text": ["Zwei Hunde spielen im Schnee.",
                                                                "Ein Mann fährt Fahrrad.", ""], "beam_size": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "model", "translations", "usage"}
    dogs, man, empty = body["translations"]
    tr = load_translation(MODELS_DIR / M)
    assert dogs["source_tokens"] == tr.src.pieces(tr.src.encode("Zwei Hunde spielen im Schnee."))
    # a trained model: cased, detokenized English, no <unk>
    assert dogs["text"].startswith("Two dogs") and "snow" in dogs["text"] and dogs["text"].endswith(".")
    assert man["text"].startswith("A man") and ("bike" in man["text"] or "bicycle" in man["text"])
    assert "<unk>" not in dogs["text"] + man["text"] and "\u2047" not in dogs["text"] + man["text"]
    assert "".join(dogs["tokens"]).replace("\u2581", " ").strip() == dogs["text"]
    assert dogs["finish_reason"] == "stop"
    assert empty == {"text": "", "finish_reason": "stop", "tokens": [], "source_tokens": [], "logprob": 0.0,
                     "attention": None, "alignment": None, "hypotheses": None}
    assert body["usage"]["prompt_tokens"] == len(dogs["source_tokens"]) + len(man["source_tokens"])
    assert body["usage"]["completion_tokens"] == len(dogs["tokens"]) + len(man["tokens"])


def test_cased_german_with_sharp_s_and_umlauts_comes_back_as_cased_english(stack):
    with stack.client() as c:
        r = c.post("/v1/translate", json={"model": M, "text": ["Ich habe das Fußballspiel gesehen.",
                                                                "Zwei Männer überqueren eine große Straße."]})
    soccer, street = (t["text"] for t in r.json()["translations"])
    # the model knows image captions, not first-person talk; but no word becomes <unk>
    assert soccer[0].isupper() and "soccer" in soccer and "<unk>" not in soccer and "\u2047" not in soccer
    assert street.startswith("Two men") and "street" in street


def test_greedy_equals_beam_of_one_and_attention_rows_cover_the_source(stack):
    with stack.client() as c:
        r = c.post("/v1/translate", json={"model": M, "text": "Eine Frau liest ein Buch.", "beam_size": 1,
                                          "return_attention": True})
    (t,) = r.json()["translations"]
    assert len(t["attention"]) == len(t["tokens"])
    assert all(len(row) == len(t["source_tokens"]) and abs(sum(row) - 1) < 1e-3 for row in t["attention"])


def test_streamed_translation_adds_up_to_the_answer(stack):
    req = {"model": M, "text": "Ein kleines Mädchen klettert in ein Spielhaus aus Holz.", "beam_size": 4}
    with stack.client() as c:
        whole = c.post("/v1/translate", json=req).json()["translations"][0]
        with c.stream("POST", "/v1/translate", json={**req, "stream": True}) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(ch["text"] for ch in chunks) == whole["text"]
    assert chunks[-1]["finish_reason"] == "stop" and chunks[-1]["translation"] == whole


def test_translation_errors(stack):
    with stack.client() as c:
        r = c.post("/v1/translate", json={"model": M, "text": ["a", "b"], "stream": True})
        assert r.status_code == 400
        assert r.json()["error"]["message"] == \
            "stream=true translates one text; send a single string or stream=false"
        r = c.post("/v1/translate", json={"model": M, "text": "a", "beam_size": 9})
        assert r.json()["error"]["param"] == "beam_size"
        r = c.post("/v1/translate", json={"model": "lm-shakespeare", "text": "a"})
        assert r.status_code == 400
        assert r.json()["error"]["message"] == \
            "model 'lm-shakespeare' is a lm model; use a translation model for this route"
        r = c.post("/v1/generate", json={"model": M, "prompt": "a"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_second_language_pair_answers_cased_english(stack):
    """translate-fr-en, trained by the same command on another pair, is served like any model folder."""
    with stack.client() as c:
        r = c.post("/v1/translate", json={"model": "translate-fr-en", "beam_size": 4,
                                          "text": ["Deux chiens jouent dans la neige.", "Un homme fait du vélo."]})
    assert r.status_code == 200, r.text
    dogs, man = (t["text"] for t in r.json()["translations"])
    assert dogs.startswith("Two dogs") and "snow" in dogs and dogs.endswith(".")
    assert man.startswith("A man") and ("bike" in man or "bicycle" in man)
    assert "<unk>" not in dogs + man and "\u2047" not in dogs + man
