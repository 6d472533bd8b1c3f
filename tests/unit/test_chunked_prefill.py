"""Chunked prefill (LMEngine's prefill_chunk): a prompt read across several steps ends in the state it
would have read whole, and the running streams keep a token per step meanwhile. Counted in steps, never
timed."""
import math

import pytest
import torch

from rnnserve.engine.lm_engine import LMEngine
from rnnserve.engine.sampling import SamplingParams
from rnnserve.engine.state import LMState
from rnnserve.models.lm import LMConfig, RNNLanguageModel
from tests.unit.test_lm_engine import run

LONG = "ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n" * 3


@pytest.fixture(scope="module", params=["lstm", "gru"])
def lm(request, tiny_lm):
    """(model, tokenizer): the tiny LSTM, and a tiny GRU with the same vocabulary."""
    if request.param == "lstm":
        return tiny_lm.model, tiny_lm.tokenizer
    torch.manual_seed(0)
    config = LMConfig(vocab_size=tiny_lm.tokenizer.vocab_size, cell="gru", embed_dim=16, hidden_size=32)
    return RNNLanguageModel(config).eval(), tiny_lm.tokenizer


def tensors(state):
    return [t for layer in state for t in (layer if isinstance(layer, tuple) else (layer,))]


def admit_all(e: LMEngine) -> int:
    """Run the engine's admission alone (no decode step moves the state) until nothing waits; -> steps."""
    steps = 0
    with torch.inference_mode():
        while e.num_waiting:
            e._admit()
            steps += 1
    return steps


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("continued", [False, True])
def test_chunked_prefill_ends_in_the_state_and_logits_of_reading_whole(lm, chunk, continued):
    model, tok = lm
    ids = tok.encode(LONG)
    init = None
    with torch.inference_mode():
        if continued:  # a session's state, its last token pending: the prompt is read after it
            _, layers = model.prefill([tok.encode("KING:\nWhat say you")])
            init = LMState(layers, tok.encode("?")[0], 17, False)
            ids = [init.pending] + ids
        logits, state = model.prefill([ids], init.layers if init else None)
    e = LMEngine(model, tok, prefill_chunk=chunk)
    e.add("short", "KING:", SamplingParams())  # read beside the long prompt's first chunk
    e.add("long", LONG, SamplingParams(), state=init)
    assert admit_all(e) == math.ceil(len(ids) / chunk)
    assert [s.request_id for s in e._running] == ["short", "long"]
    torch.testing.assert_close(e._logits[1:], logits, atol=1e-5, rtol=0)
    for got, want in zip(tensors(e._state), tensors(state)):
        torch.testing.assert_close(got[:, 1:], want, atol=1e-5, rtol=0)


def test_generation_and_echo_from_chunked_prompts_equal_unchunked(lm):
    model, tok = lm
    with torch.inference_mode():
        _, layers = model.prefill([tok.encode("KING:\nWhat say you")])
    state = LMState(layers, tok.encode("?")[0], 17, False)
    results = []
    for chunk in (None, 13):
        e = LMEngine(model, tok, prefill_chunk=chunk)
        e.add("greedy", LONG, SamplingParams(max_tokens=40, temperature=0.0), logprobs=2, echo=True)
        e.add("sampled", LONG[:150], SamplingParams(max_tokens=40, seed=5, top_p=0.9))
        e.add("same", LONG[:150], SamplingParams(max_tokens=40, seed=5, top_p=0.9))  # read once when whole
        e.add("continued", LONG[50:], SamplingParams(max_tokens=40, temperature=0.0), logprobs=0, echo=True,
              state=state)
        e.add("stepped", "", SamplingParams(max_tokens=40, temperature=0.0), logprobs=0, echo=True, state=state)
        echoes = {}
        texts = {}
        while e.has_work():
            for o in e.step(4):
                texts[o.request_id] = texts.get(o.request_id, "") + o.text
                if o.prompt_logprobs is not None:
                    echoes[o.request_id] = o.prompt_logprobs
        results.append((texts, echoes))
    (whole, whole_echo), (chunked, chunked_echo) = results
    assert chunked == whole and all(len(t) == 40 for t in whole.values())
    assert whole["same"] == whole["sampled"]
    assert chunked_echo.keys() == whole_echo.keys() == {"greedy", "continued", "stepped"}
    for rid in whole_echo:
        a, b = whole_echo[rid], chunked_echo[rid]
        assert [x.token for x in a] == [x.token for x in b] and [x.top and [t for t, _ in x.top] for x in a] == [
            x.top and [t for t, _ in x.top] for x in b]
        assert [x.logprob for x in b] == pytest.approx([x.logprob for x in a], abs=1e-5, nan_ok=True)
    assert len(whole_echo["greedy"]) == len(LONG) and whole_echo["greedy"][0].logprob is None
    assert len(whole_echo["continued"]) == len(LONG) - 50 and whole_echo["stepped"] == []


def test_running_streams_keep_a_token_per_step_while_a_long_prompt_is_read(tiny_lm, monkeypatch):
    C = 16
    e = LMEngine(tiny_lm.model, tiny_lm.tokenizer, prefill_chunk=C)
    reads = []  # prompt tokens each prefill call read
    prefill = tiny_lm.model.prefill
    monkeypatch.setattr(tiny_lm.model, "prefill", lambda prompts, *a, **k: reads.append(sum(map(len, prompts)))
                        or prefill(prompts, *a, **k))
    e.add("run", "ROMEO:", SamplingParams(max_tokens=500, seed=1))
    e.step(1)
    e.add("long", LONG, SamplingParams(max_tokens=5, seed=2))
    steps = math.ceil(len(LONG) / C)
    for k in range(1, steps + 1):
        outs = {o.request_id: o for o in e.step(1)}
        assert outs["run"].completion_tokens == 1 + k  # the running stream's token, every step
        if k < steps:
            assert "long" not in outs and e.num_waiting == 1 and "long" in e
        else:
            assert outs["long"].completion_tokens == 1 and e.num_waiting == 0
    assert reads[1:] == [C] * (steps - 1) + [len(LONG) - C * (steps - 1)]


def test_short_prompts_never_wait_behind_a_long_one_and_it_is_not_starved(tiny_lm):
    C = 10
    e = LMEngine(tiny_lm.model, tiny_lm.tokenizer, prefill_chunk=C)
    e.add("long", LONG[:95], SamplingParams(max_tokens=200, seed=2))
    e.add("second", LONG[:35], SamplingParams(max_tokens=200, seed=3))  # two long prompts read side by side
    first = {}
    for k in range(1, 15):
        e.add(f"after{k}", "cd", SamplingParams(max_tokens=200, seed=k))  # a new short prompt every step
        for o in e.step(1):
            first.setdefault(o.request_id, k)
    assert all(first[f"after{k}"] == k for k in range(1, 15))  # each read in the step it arrived
    assert first["long"] == math.ceil(95 / C) and first["second"] == math.ceil(35 / C)


def test_abort_mid_prefill_frees_the_prompt(tiny_lm):
    e = LMEngine(tiny_lm.model, tiny_lm.tokenizer, prefill_chunk=8)
    e.add("long", LONG, SamplingParams(max_tokens=5))
    assert e.step(1) == [] and e.has_work() and e.num_waiting == 1  # waiting counts a prompt being read
    e.add("next", "a", SamplingParams(max_tokens=3, seed=1))  # read beside it
    e.step(1)
    assert e.num_waiting == 1 and e.num_running == 1
    assert e.abort("long") and "long" not in e and e.num_waiting == 0
    texts, finals = run(e)
    assert set(texts) == {"next"} and finals["next"].completion_tokens == 3
    assert not e.has_work() and e.request_ids() == []


@pytest.mark.parametrize("chunk", [None, 0])
def test_no_chunk_reads_every_prompt_in_one_step(tiny_lm, chunk):
    e = LMEngine(tiny_lm.model, tiny_lm.tokenizer, prefill_chunk=chunk)
    e.add("long", LONG, SamplingParams(max_tokens=5))
    e.add("short", "a", SamplingParams(max_tokens=5))
    assert {o.request_id for o in e.step(1)} == {"long", "short"}
    with pytest.raises(ValueError, match="prefill_chunk"):
        LMEngine(tiny_lm.model, tiny_lm.tokenizer, prefill_chunk=-1)
