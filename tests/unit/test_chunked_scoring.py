"""Chunked scoring (LMEngine._score): texts are read like prompts, at most `prefill_chunk` tokens of each and
MAX_SCORE_TEXTS texts per step, with their states carried between steps; the scores equal reading each
text whole, and the running streams keep a token per step meanwhile. Counted in steps, never timed."""
import math

import pytest
import torch

from rnnserve.engine.lm_engine import MAX_SCORE_TEXTS, LMEngine
from rnnserve.engine.sampling import SamplingParams

LONG = "ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n" * 3
TEXTS = [LONG, "To be", "", LONG[:77], "a"]


def score(engine: LMEngine, texts: list[str], token_logprobs: bool = True):
    """-> (the final output, every text's token logprobs as sent, steps taken)."""
    engine.add_score("s", texts, token_logprobs)
    entries: dict[int, list] = {}
    steps, final = 0, None
    while final is None:
        steps += 1
        for o in engine.step(1):
            for i, part in o.score_logprobs or []:
                entries.setdefault(i, []).extend(part)
            if o.finished:
                final = o
    return final, entries, steps


def whole(tiny_lm, text: str) -> list[float]:
    """The text's token logprobs from one read of a line break and the whole text."""
    ids = tiny_lm.tokenizer.encode("\n" + text)
    with torch.inference_mode():
        logits, _ = tiny_lm.model.prefill([ids], every_position=True)
    lp = torch.log_softmax(logits[0].float(), -1)
    return [float(lp[p, t]) for p, t in enumerate(ids[1:])]


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_scores_equal_whole_reads(tiny_lm, chunk):
    final, entries, steps = score(LMEngine(tiny_lm.model, tiny_lm.tokenizer, prefill_chunk=chunk), TEXTS)
    unchunked, unchunked_entries, one_step = score(LMEngine(tiny_lm.model, tiny_lm.tokenizer), TEXTS)
    assert one_step == 1 and steps == math.ceil(len(LONG) / chunk)  # the longest text sets the steps
    for i, text in enumerate(TEXTS):
        want = whole(tiny_lm, text)
        got = [e.logprob for e in entries.get(i, [])]
        assert "".join(e.token for e in entries.get(i, [])) == text
        assert got == pytest.approx(want, abs=1e-4)
        assert final.scores[i]["tokens"] == len(text)
        assert final.scores[i]["logprob"] == pytest.approx(sum(want), abs=1e-3)
        assert final.scores[i]["logprob"] == pytest.approx(unchunked.scores[i]["logprob"], abs=1e-3)
        assert [e.logprob for e in unchunked_entries.get(i, [])] == pytest.approx(want, abs=1e-4)
    assert final.prompt_tokens == sum(map(len, TEXTS))


def test_a_step_reads_a_chunk_of_at_most_max_score_texts(tiny_lm, monkeypatch):
    C = 16
    e = LMEngine(tiny_lm.model, tiny_lm.tokenizer, prefill_chunk=C)
    reads = []  # (rows, longest row) of each scoring read
    prefill = tiny_lm.model.prefill
    monkeypatch.setattr(tiny_lm.model, "prefill", lambda prompts, *a, **k: reads.append(
        (len(prompts), max(map(len, prompts)))) or prefill(prompts, *a, **k))
    e.add_score("a", [LONG] * MAX_SCORE_TEXTS)
    e.add_score("b", [LONG[:40]] * 3)
    done = {}
    step = 0
    while e.has_work():
        step += 1
        for o in e.step(1):
            if o.finished:
                done[o.request_id] = step
    assert all(rows <= MAX_SCORE_TEXTS and longest <= C for rows, longest in reads)
    per_text = math.ceil(len(LONG) / C)
    # "a" fills every step's rows until it is read; "b" then follows
    assert done == {"a": per_text, "b": per_text + math.ceil(40 / C)}


def test_running_streams_keep_a_token_per_step_while_texts_are_scored(tiny_lm):
    C = 16
    e = LMEngine(tiny_lm.model, tiny_lm.tokenizer, prefill_chunk=C)
    e.add("run", "ROMEO:", SamplingParams(max_tokens=500, seed=1))
    e.step(1)
    e.add_score("s", [LONG] * 4)
    steps = math.ceil(len(LONG) / C)
    for k in range(1, steps + 1):
        outs = {o.request_id: o for o in e.step(1)}
        assert outs["run"].completion_tokens == 1 + k
        assert ("s" in outs) == (k == steps) and ("s" in e) == (k < steps)
    assert outs["s"].finished and len(outs["s"].scores) == 4


def test_abort_mid_scoring_forgets_the_request(tiny_lm):
    e = LMEngine(tiny_lm.model, tiny_lm.tokenizer, prefill_chunk=8)
    e.add_score("s", [LONG])
    assert e.step(1) == [] and "s" in e and e.has_work()
    assert e.abort("s") and "s" not in e and not e.has_work()


def test_scoring_without_token_logprobs_sends_nothing_before_its_end(tiny_lm):
    final, entries, steps = score(LMEngine(tiny_lm.model, tiny_lm.tokenizer, prefill_chunk=10), [LONG[:35]],
                                  token_logprobs=False)
    assert steps == 4 and entries == {} and final.score_logprobs is None
    assert final.scores[0]["logprob"] == pytest.approx(sum(whole(tiny_lm, LONG[:35])), abs=1e-3)
