"""The translation handler's bound on an answer's size (service/handlers/answer_size.py): an upper bound of
the real last frame, and a request over the limit refused with 400 naming its fields, before any work."""
import json

import pytest

from rnnserve.service.handlers import answer_size
from tests.unit.test_translation_handler import make

TEXTS = ["Zwei Hunde spielen im Schnee!", "Ein Mann läuft über die Straße.", "\"Ja\", sagt sie."]


@pytest.mark.parametrize("fields", [
    {"beam_size": 1},
    {"beam_size": 4, "n_best": 4, "return_attention": True, "return_alignment": True},
    {"beam_size": 2, "max_tokens": 40, "return_attention": True, "target_prefix": "A \"dog\""},
])
def test_the_bound_holds_the_real_last_frame(tiny_translation_folder, fields):
    fe = make(tiny_translation_folder)
    fe.submit("a", {"texts": TEXTS, **fields})
    fe.drain()
    h = fe.h
    sources = [h.src.encode(t) for t in TEXTS]
    prefix = len(h.tgt.encode(fields.get("target_prefix", ""))) if "target_prefix" in fields else 0
    outputs = [prefix + (fields.get("max_tokens") or min(h.engine.max_tokens_limit, 2 * len(s) + 10)) for s in sources]
    bound = answer_size.translation_bytes([len(s) for s in sources], outputs, fields.get("n_best", 1),
                                          fields.get("return_attention", False), fields.get("return_alignment", False),
                                          h.src_token_bytes, h.tgt_token_bytes)
    last = json.dumps(fe.frames["a"][-1], ensure_ascii=False).encode()
    assert "translations" in fe.frames["a"][-1] and len(last) <= bound


def test_a_request_whose_answer_could_pass_the_limit_is_refused_before_any_work(tiny_translation_folder, monkeypatch):
    fe = make(tiny_translation_folder)
    h = fe.h
    sources = [h.src.encode(t) for t in TEXTS]
    small = answer_size.translation_bytes([len(s) for s in sources], [20] * 3, 1, False, False,
                                          h.src_token_bytes, h.tgt_token_bytes)
    monkeypatch.setattr(answer_size, "MAX_ANSWER_BYTES", small)
    fe.submit("fits", {"texts": TEXTS, "beam_size": 2, "max_tokens": 20})
    fe.submit("big", {"texts": TEXTS, "beam_size": 4, "n_best": 2, "max_tokens": 20, "return_alignment": True})
    fe.submit("long", {"texts": TEXTS, "beam_size": 2, "max_tokens": 21})
    fe.step()
    assert "big" not in h.engine and "long" not in h.engine and "fits" in h.engine
    fe.drain()
    message = (f"the answer to this request could exceed {small // 2**20} MiB, the limit of one answer; it grows with "
               "text, max_tokens{}: send fewer or shorter texts, lower max_tokens or n_best, or leave out "
               "return_attention")
    assert fe.frames["big"][-1] == {"error": {"message": message.format(", n_best, return_alignment"),
                                              "type": "invalid_request_error", "code": 400, "param": "n_best"}}
    assert fe.frames["long"][-1]["error"]["param"] == "max_tokens"
    assert fe.frames["long"][-1]["error"]["message"] == message.format("")
    assert len(fe.frames["fits"][-1]["translations"]) == 3
