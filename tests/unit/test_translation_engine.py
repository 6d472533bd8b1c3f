import warnings

import pytest
import torch

from rnnserve.engine.translation_engine import TranslationEngine, TranslationParams
from rnnserve.models.seq2seq import EOS, Seq2Seq, Seq2SeqConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(5)
    return Seq2Seq(Seq2SeqConfig(src_vocab=40, tgt_vocab=30, embed_dim=16, enc_hidden=12, dec_hidden=20,
                                 attn_dim=10, enc_layers=1, dropout=0.0)).eval()


def run(engine):
    results, streamed = {}, {}
    while engine.has_work():
        for o in engine.step():
            for i, toks in o.new_tokens.items():
                streamed.setdefault(o.request_id, {}).setdefault(i, []).extend(toks)
            if o.finished:
                results[o.request_id] = o
    return results, streamed


def alone(model, src, params):
    e = TranslationEngine(model)
    e.add("x", [src], params)
    return run(e)[0]["x"].results[0]


def test_joining_a_running_batch_changes_nothing(model):
    p4 = TranslationParams(beam_size=4, max_tokens=12)
    p1 = TranslationParams(beam_size=1, max_tokens=12)
    want_a, want_b = alone(model, [5, 6, 7, 8], p4), alone(model, [9, 10], p1)
    e = TranslationEngine(model)
    e.add("other", [[11, 12, 13, 14, 15, 16, 17, 18, 19]], TranslationParams(beam_size=3, max_tokens=20))
    e.step()
    e.step()
    e.add("a", [[5, 6, 7, 8]], p4)  # joins mid-way, beside a longer source and another beam width
    e.add("b", [[9, 10]], p1)
    results, _ = run(e)
    assert results["a"].results[0].tokens == want_a.tokens
    assert results["a"].results[0].score == pytest.approx(want_a.score, abs=1e-4)
    assert results["b"].results[0].tokens == want_b.tokens


def test_streamed_tokens_add_up_to_the_final_translation(model):
    import copy

    model = copy.deepcopy(model)
    model.decoder.out.bias.data[EOS] = -1e4  # never ends early: every sentence runs to max_tokens
    e = TranslationEngine(model)
    e.add("r", [[5, 6, 7], [20, 21, 22, 23, 24], []], TranslationParams(beam_size=4, max_tokens=15))
    results, streamed = run(e)
    out = results["r"]
    assert [len(r.tokens) for r in out.results] == [len(streamed.get("r", {}).get(i, [])) for i in range(3)]
    for i, r in enumerate(out.results):
        assert streamed.get("r", {}).get(i, []) == r.tokens
    assert [len(r.tokens) for r in out.results] == [15, 15, 0]
    assert [r.finish_reason for r in out.results] == ["length", "length", "stop"]
    assert out.results[2].tokens == [] and out.results[2].finish_reason == "stop"
    assert out.prompt_tokens == 8 and out.completion_tokens == sum(len(r.tokens) for r in out.results)


def test_attention_rows_cover_the_source(model):
    e = TranslationEngine(model)
    e.add("r", [[5, 6, 7], [8, 9, 10, 11, 12, 13]], TranslationParams(beam_size=2, max_tokens=6, return_attention=True))
    res = run(e)[0]["r"].results
    for r, n in zip(res, (3, 6)):
        assert len(r.attention) == len(r.tokens)
        assert all(len(row) == n and abs(sum(row) - 1) < 1e-4 for row in r.attention)


def test_rows_are_bounded_and_the_rest_waits(model):
    e = TranslationEngine(model, max_rows=8)
    e.add("a", [[5, 6]] * 3, TranslationParams(beam_size=4, max_tokens=5))
    e.step()
    assert e.num_rows == 8  # two sentences of four beams; the third waits
    results, _ = run(e)
    assert len(results["a"].results) == 3 and e.num_rows == 0


def test_abort_frees_rows_at_once(model):
    e = TranslationEngine(model)
    e.add("a", [[5, 6, 7]], TranslationParams(beam_size=8, max_tokens=30))
    e.add("b", [[5, 6, 7]], TranslationParams(beam_size=2, max_tokens=30))
    e.step()
    assert e.abort("a") and e.num_rows == 2 and "a" not in e
    results, _ = run(e)
    assert set(results) == {"b"}


@pytest.mark.parametrize("params,message", [
    (TranslationParams(beam_size=9), "beam_size"), (TranslationParams(beam_size=0), "beam_size"),
    (TranslationParams(max_tokens=10**6), "max_tokens"), (TranslationParams(length_penalty=-1), "length_penalty"),
])
def test_invalid_params_are_refused_and_leave_nothing(model, params, message):
    e = TranslationEngine(model)
    with pytest.raises(ValueError, match=message):
        e.add("a", [[5]], params)
    assert not e.has_work() and e.request_ids() == []


def test_merged_outputs_keep_order_and_the_end():
    from rnnserve.engine.translation_engine import TranslationOutput, merge_outputs

    a = TranslationOutput("r", {0: [4, 5]}, batch_size=8)
    b = TranslationOutput("r", {0: [6], 1: [7]}, finished=True, results=[], prompt_tokens=3, completion_tokens=4,
                          batch_size=4)
    m = merge_outputs(a, b)
    assert m.new_tokens == {0: [4, 5, 6], 1: [7]} and m.finished and m.completion_tokens == 4 and m.batch_size == 8


def test_n_best_prefix_and_forced_scores_agree(model):
    src = [5, 9, 13, 7, 22]
    best = alone(model, src, TranslationParams(beam_size=4, n_best=3, return_alignment=True))
    hyps = best.hypotheses
    assert len(hyps) == 3 and hyps[0].tokens == best.tokens
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    assert len(best.alignment) == len(best.tokens) and all(0 <= i < len(src) for i in best.alignment)
    e = TranslationEngine(model)
    e.add_score("s", src, [h.tokens for h in hyps])
    (out,) = e.step()
    for h, s in zip(hyps, out.scores):  # forced decoding adds <eos> where the beam stopped at max length
        assert s["tokens"] == len(h.tokens) and s["logprob"] <= h.logprob + 1e-4
    prefix = [11 if best.tokens[:1] != [11] else 12, 3 + 4]
    e = TranslationEngine(model)
    e.add("p", [src], TranslationParams(beam_size=3), [prefix])
    forced = run(e)[0]["p"].results[0]
    assert forced.tokens[:2] == prefix


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_decoder_step_reads_the_device_once():
    """Beam search stays on the GPU: a step with no admission or retirement syncs once (its packed read)."""
    torch.manual_seed(5)
    gpu_model = Seq2Seq(Seq2SeqConfig(src_vocab=40, tgt_vocab=30, embed_dim=16, enc_hidden=12, dec_hidden=20,
                                      attn_dim=10, enc_layers=1, dropout=0.0)).cuda().eval()
    gpu_model.decoder.out.bias.data[EOS] = -30.0  # no beam ends: nothing retires in the measured step
    engine = TranslationEngine(gpu_model, device="cuda")
    engine.add("a", [[5, 6, 7], [8, 9]], TranslationParams(beam_size=4, max_tokens=12))
    engine.step()  # admission and the first step
    engine.step()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len([w for w in caught if "synchroniz" in str(w.message)]) == 1
