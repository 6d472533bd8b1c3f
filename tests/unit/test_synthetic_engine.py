import pytest

from rnnserve.engine.sampling import SamplingParams
from rnnserve.engine.synthetic import PASSAGE, SyntheticEngine


def _run(engine: SyntheticEngine, num_tokens: int) -> dict[str, list]:
    outs: dict[str, list] = {}
    while engine.has_work():
        for o in engine.step(num_tokens):
            outs.setdefault(o.request_id, []).append(o)
    return outs


def test_text_is_the_passage_from_the_seed_and_ends_at_max_tokens():
    engine = SyntheticEngine()
    engine.add("a", "ROMEO:", SamplingParams(max_tokens=300, seed=5))
    outs = _run(engine, 32)["a"]
    assert [len(o.text) for o in outs] == [32] * 9 + [12]
    assert "".join(o.text for o in outs) == ((PASSAGE * 3)[5:305])
    last = outs[-1]
    assert (last.finished, last.finish_reason, last.completion_tokens, last.prompt_tokens) == (True, "length", 300, 6)
    assert not engine.request_ids()


def test_a_stop_string_across_steps_ends_the_text_exactly_before_it():
    engine = SyntheticEngine()
    stop = "winter"  # PASSAGE[11:17]; the steps of 4 tokens cut it in two
    engine.add("a", "", SamplingParams(max_tokens=100, stop=[stop]))
    outs = _run(engine, 4)["a"]
    assert "".join(o.text for o in outs) == "Now is the "
    assert outs[-1].finish_reason == "stop"


def test_the_batch_is_bounded_and_aborted_requests_leave_it():
    engine = SyntheticEngine(max_batch_size=2)
    for rid in "abc":
        engine.add(rid, "", SamplingParams(max_tokens=8))
    first = engine.step(4)
    assert sorted(o.request_id for o in first) == ["a", "b"] and first[0].batch_size == 2
    assert engine.abort("a") and not engine.abort("a")
    second = engine.step(4)
    assert sorted(o.request_id for o in second) == ["b", "c"]
    assert sorted(engine.request_ids()) == ["c"]


def test_what_it_cannot_do_is_refused():
    engine = SyntheticEngine(max_prompt_chars=4)
    with pytest.raises(ValueError, match="no logprobs"):
        engine.add("a", "", SamplingParams(max_tokens=8), logprobs=1)
    with pytest.raises(ValueError, match="at most 4 characters"):
        engine.add("a", "hello", SamplingParams(max_tokens=8))
    with pytest.raises(ValueError, match="does not score"):
        engine.add_score("a", ["x"])
    assert not engine.has_work()


def test_a_step_makes_as_many_tokens_as_its_budget_holds_and_sleeps_them(monkeypatch):
    import rnnserve.engine.synthetic as synthetic

    slept = []
    monkeypatch.setattr(synthetic.time, "sleep", slept.append)
    engine = SyntheticEngine(token_ms=2.0)
    engine.add("a", "", SamplingParams(max_tokens=40))
    assert [len(o.text) for o in engine.step(32, budget_s=0.010)] == [5]  # 10 ms at 2 ms a token
    assert [len(o.text) for o in engine.step(32, budget_s=0.001)] == [1]  # at least one
    assert [len(o.text) for o in engine.step(32)] == [32]
    assert [len(o.text) for o in engine.step(32)] == [2]  # no more than max_tokens
    assert slept == pytest.approx([0.010, 0.002, 0.064, 0.004])
