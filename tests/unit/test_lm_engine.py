import pytest

from rnnserve.engine.lm_engine import LMEngine
from rnnserve.engine.sampling import SamplingParams


def run(engine, num_tokens=1):
    texts, finals = {}, {}
    while engine.has_work():
        for o in engine.step(num_tokens):
            texts[o.request_id] = texts.get(o.request_id, "") + o.text
            if o.finished:
                finals[o.request_id] = o
    return texts, finals


def test_generates_exactly_max_tokens_from_the_vocabulary(tiny_lm):
    e = LMEngine(tiny_lm.model, tiny_lm.tokenizer)
    e.add("a", "ROMEO:", SamplingParams(max_tokens=37, seed=1))
    texts, finals = run(e, 4)
    assert len(texts["a"]) == 37
    assert set(texts["a"]) <= set(tiny_lm.tokenizer.chars)
    assert finals["a"].finish_reason == "length"
    assert (finals["a"].prompt_tokens, finals["a"].completion_tokens) == (6, 37)
    assert e.num_running == 0 and e.request_ids() == []


def test_seeded_output_does_not_depend_on_batch_or_step_size(tiny_lm):
    alone = LMEngine(tiny_lm.model, tiny_lm.tokenizer)
    alone.add("x", "To be", SamplingParams(max_tokens=50, seed=42, top_p=0.9, top_k=20))
    ref, _ = run(alone, 1)

    shared = LMEngine(tiny_lm.model, tiny_lm.tokenizer)
    shared.add("o1", "Other text", SamplingParams(max_tokens=80, seed=1))
    shared.step(3)  # x joins a batch that is already running
    shared.add("x", "To be", SamplingParams(max_tokens=50, seed=42, top_p=0.9, top_k=20))
    shared.add("o2", "", SamplingParams(max_tokens=5, temperature=0.0))
    texts, _ = run(shared, 7)
    assert texts["x"] == ref["x"]


def test_stop_string_ends_the_text_before_it_and_is_never_streamed(tiny_lm):
    e = LMEngine(tiny_lm.model, tiny_lm.tokenizer)
    e.add("g", "", SamplingParams(max_tokens=200, temperature=0.0))
    full, _ = run(e)
    stop = full["g"][20:23]  # greedy text is deterministic: stop where it is known to occur
    first = full["g"].find(stop)
    e.add("s", "", SamplingParams(max_tokens=200, temperature=0.0, stop=[stop]))
    streamed = []
    while e.has_work():
        for o in e.step(1):
            streamed.append(o.text)
            final = o
    assert "".join(streamed) == full["g"][:first]
    assert final.finish_reason == "stop"
    assert all(stop not in "".join(streamed[: i + 1]) for i in range(len(streamed)))


def test_batch_capacity_queues_the_rest(tiny_lm):
    e = LMEngine(tiny_lm.model, tiny_lm.tokenizer, max_batch_size=2)
    for i in range(3):
        e.add(f"r{i}", "a", SamplingParams(max_tokens=3))
    outs = e.step(1)
    assert [o.request_id for o in outs] == ["r0", "r1"]
    assert e.num_waiting == 1
    texts, _ = run(e)
    assert len(texts["r2"]) == 3


def test_abort_frees_the_row_and_others_continue(tiny_lm):
    e = LMEngine(tiny_lm.model, tiny_lm.tokenizer)
    e.add("keep", "a", SamplingParams(max_tokens=10, seed=3))
    e.add("gone", "b", SamplingParams(max_tokens=10))
    e.step(2)
    assert e.abort("gone") and not e.abort("gone")
    assert e.num_running == 1
    texts, finals = run(e)
    assert "gone" not in finals and finals["keep"].completion_tokens == 10


def test_invalid_request_is_refused_and_leaves_no_trace(tiny_lm):
    e = LMEngine(tiny_lm.model, tiny_lm.tokenizer, max_tokens_limit=100, max_prompt_chars=10)
    with pytest.raises(ValueError, match="at most 100"):
        e.add("a", "x", SamplingParams(max_tokens=101))
    with pytest.raises(ValueError, match="at most 10 characters"):
        e.add("b", "x" * 11, SamplingParams())
    assert not e.has_work() and e.request_ids() == []
    e.add("a", "x", SamplingParams(max_tokens=2))  # the id is free again
    with pytest.raises(ValueError, match="duplicate"):
        e.add("a", "x", SamplingParams(max_tokens=2))


def test_unknown_prompt_characters_are_served(tiny_lm):
    e = LMEngine(tiny_lm.model, tiny_lm.tokenizer)
    e.add("u", "Ça va? \U0001F600 — ☃", SamplingParams(max_tokens=5))
    texts, finals = run(e)
    assert len(texts["u"]) == 5


def test_time_budget_bounds_the_step_but_always_decodes_one_token(tiny_lm):
    e = LMEngine(tiny_lm.model, tiny_lm.tokenizer)
    for i in range(3):
        e.add(f"r{i}", "ROMEO:", SamplingParams(max_tokens=40, seed=i))
    spent = e.step(16, budget_s=0.0)  # the budget is gone after prefill: one token each, not zero
    assert [o.completion_tokens for o in spent] == [1, 1, 1]
    roomy = e.step(16, budget_s=60.0)  # a budget that never runs out leaves num_tokens in charge
    assert [o.completion_tokens for o in roomy] == [17, 17, 17]


def test_stop_ends_the_step_after_the_current_token_and_the_text_stays_the_same(tiny_lm):
    """What a server's new arrivals use to cut a running step short: `stop` is asked after each token."""
    ref = LMEngine(tiny_lm.model, tiny_lm.tokenizer)
    ref.add("x", "To be", SamplingParams(max_tokens=30, seed=7))
    expected, _ = run(ref, 30)
    e = LMEngine(tiny_lm.model, tiny_lm.tokenizer)
    e.add("x", "To be", SamplingParams(max_tokens=30, seed=7))
    asked = []
    outs = [e.step(16, stop=lambda: asked.append(1) or len(asked) >= 5)[0]]
    assert outs[0].completion_tokens == 5 and len(asked) == 5
    outs.append(e.step(16, stop=lambda: True)[0])  # one token even when stopped at once
    assert outs[1].completion_tokens == 6
    outs.append(e.step(30)[0])
    assert outs[2].finished and outs[2].completion_tokens == 30
    assert "".join(o.text for o in outs) == expected["x"]


def test_seeded_output_does_not_depend_on_the_time_budget(tiny_lm):
    ref = LMEngine(tiny_lm.model, tiny_lm.tokenizer)
    ref.add("x", "To be", SamplingParams(max_tokens=30, seed=7))
    expected, _ = run(ref, 30)
    e = LMEngine(tiny_lm.model, tiny_lm.tokenizer)
    e.add("x", "To be", SamplingParams(max_tokens=30, seed=7))
    text = ""
    while e.has_work():
        text += "".join(o.text for o in e.step(16, budget_s=0.0005))
    assert text == expected["x"]


def test_logprobs_follow_the_text_and_stop_strings(tiny_lm):
    e = LMEngine(tiny_lm.model, tiny_lm.tokenizer)
    e.add("a", "ROMEO:", SamplingParams(max_tokens=40, seed=3), logprobs=2)
    e.add("b", "ROMEO:", SamplingParams(max_tokens=200, seed=4, stop=["e"]), logprobs=0)
    entries, finals = {}, {}
    while e.has_work():
        for o in e.step(5):
            entries.setdefault(o.request_id, []).extend(o.logprobs)
            if o.finished:
                finals[o.request_id] = o
    texts = {k: "".join(x.token for x in v) for k, v in entries.items()}
    a = entries["a"]
    assert len(a) == 40 and all(len(x.top) == 2 and x.top[0][1] >= x.top[1][1] >= -1e9 for x in a)
    assert finals["a"].cumulative_logprob == pytest.approx(sum(x.logprob for x in a))
    # the token that completes the stop string is cut with the text
    assert "e" not in texts["b"] and all(x.top is None for x in entries["b"])


def test_scores_are_sums_of_conditional_logprobs(tiny_lm):
    import torch

    e = LMEngine(tiny_lm.model, tiny_lm.tokenizer)
    e.add_score("s", ["To be", ""], token_logprobs=True)
    (out,) = e.step()
    one, empty = out.scores
    assert empty == {"text": "", "logprob": 0, "tokens": 0}
    assert [i for i, _ in out.score_logprobs] == [0]  # the empty text has no tokens
    ids = tiny_lm.tokenizer.encode("\nTo be")
    with torch.no_grad():
        logits, _, _ = tiny_lm.model(torch.tensor([ids[:-1]]))
    lp = torch.log_softmax(logits[0], -1)
    expected = sum(float(lp[i, t]) for i, t in enumerate(ids[1:]))
    assert one["logprob"] == pytest.approx(expected, abs=1e-4) and one["tokens"] == 5
    assert [t.token for t in out.score_logprobs[0][1]] == list("To be")
    assert not e.has_work() and e.request_ids() == []


def test_identical_prompts_are_read_once(tiny_lm, monkeypatch):
    e = LMEngine(tiny_lm.model, tiny_lm.tokenizer)
    read = []
    prefill = tiny_lm.model.prefill
    monkeypatch.setattr(tiny_lm.model, "prefill", lambda prompts, *a, **k: read.append(len(prompts)) or
                        prefill(prompts, *a, **k))
    for i in range(3):
        e.add(f"r{i}", "KING:", SamplingParams(max_tokens=10, seed=i))
    e.add("other", "QUEEN:", SamplingParams(max_tokens=10, seed=9))
    texts, _ = run(e, 5)
    assert read == [2]
    alone = LMEngine(tiny_lm.model, tiny_lm.tokenizer)
    alone.add("r1", "KING:", SamplingParams(max_tokens=10, seed=1))
    assert run(alone)[0]["r1"] == texts["r1"]


def test_echo_returns_the_prompts_logprobs(tiny_lm):
    e = LMEngine(tiny_lm.model, tiny_lm.tokenizer)
    e.add("a", "ROMEO:", SamplingParams(max_tokens=3, temperature=0), logprobs=1, echo=True)
    (first,) = e.step(1)
    prompt = first.prompt_logprobs
    assert [p.token for p in prompt] == list("ROMEO:") and prompt[0].logprob is None
    assert all(p.logprob < 0 and len(p.top) == 1 for p in prompt[1:])


def test_a_batch_of_1024_rows_decodes_together(tiny_lm):
    # the GPU profile's max_batch_size (service/archive.py): nothing in the engine caps it lower
    e = LMEngine(tiny_lm.model, tiny_lm.tokenizer, max_batch_size=1024)
    for i in range(1030):
        e.add(str(i), "KING:" if i % 2 else "", SamplingParams(max_tokens=3, seed=i, temperature=i % 3 * 0.5))
    first = e.step(1)
    assert len(first) == 1024 and {o.batch_size for o in first} == {1024} and e.num_running == 1024
    texts, finals = run(e, 2)
    assert len(finals) == 1030 and all(o.completion_tokens == 3 for o in finals.values())
