"""The bucketed decode step (models/graphs.py) equals the plain step, and its outputs never alias its
buffers. On CPU it runs padded and eager; the capture tests need a CUDA GPU and are skipped without one."""
import pytest
import torch

from rnnserve.engine.lm_engine import LMEngine
from rnnserve.engine.sampling import SamplingParams
from rnnserve.models.decode import LSTMStep, decode_step
from rnnserve.models.graphs import GraphedStep, buckets_upto
from rnnserve.models.lm import LMConfig, RNNLanguageModel

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model(cell: str = "lstm", num_layers: int = 2) -> RNNLanguageModel:
    torch.manual_seed(0)
    m = RNNLanguageModel(LMConfig(vocab_size=13, cell=cell, embed_dim=8, hidden_size=16,
                                  num_layers=num_layers)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m


def _random_state(m: RNNLanguageModel, batch: int, device="cpu", dtype=torch.float32):
    return [tuple(torch.randn_like(t) for t in layer) if isinstance(layer, tuple) else torch.randn_like(layer)
            for layer in m.init_state(batch, device, dtype)]


def _tensors(state):
    return [t for layer in state for t in (layer if isinstance(layer, tuple) else (layer,))]


def _assert_same(got, want, atol=1e-5, rtol=1e-5):
    (gl, gs), (wl, ws) = got, want
    torch.testing.assert_close(gl, wl, atol=atol, rtol=rtol)
    for g, w in zip(_tensors(gs), _tensors(ws), strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)


def test_buckets_cover_every_batch_up_to_the_largest():
    assert buckets_upto(1) == [1]
    assert buckets_upto(64) == [1, 2, 4, 8, 16, 32, 64]
    assert buckets_upto(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert buckets_upto(1024)[-1] == 1024 and buckets_upto(4096)[-1] == 1024
    g = GraphedStep(lambda t, s: (t, s), 100)
    assert [g.bucket(b) for b in (1, 3, 64, 65, 100, 101)] == [1, 4, 64, 100, 100, None]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_padded_buckets_equal_the_plain_step(cell):
    m = _model(cell)
    step = decode_step(m)
    graphed = GraphedStep(step, max_batch=16, capture=False)
    with torch.inference_mode():
        # 8 first, then smaller batches in the same bucket: rows past B hold an earlier batch's state
        for B in (8, 5, 1, 3, 7, 16, 2):
            tokens = torch.randint(0, 13, (B,))
            state = _random_state(m, B)
            _assert_same(graphed(tokens, state), step(tokens, state))
    assert sorted(graphed._buckets) == [1, 2, 4, 8, 16]


def test_batches_past_the_largest_bucket_run_the_plain_step():
    m = _model()
    graphed = GraphedStep(decode_step(m), max_batch=4, capture=False)
    with torch.inference_mode():
        tokens, state = torch.randint(0, 13, (6,)), _random_state(m, 6)
        _assert_same(graphed(tokens, state), LSTMStep(m)(tokens, state), atol=0, rtol=0)
    assert graphed._buckets == {}


def test_outputs_do_not_alias_the_buffers_and_survive_the_next_call():
    m = _model()
    step = decode_step(m)
    graphed = GraphedStep(step, max_batch=8, capture=False)
    with torch.inference_mode():
        tokens, state = torch.randint(0, 13, (5,)), _random_state(m, 5)
        logits, new_state = graphed(tokens, state)
        kept = logits.clone(), [t.clone() for t in _tensors(new_state)]
        buf = graphed._buckets[8]
        storages = {t.untyped_storage().data_ptr() for t in [buf.tokens, *buf.state]}
        for t in [logits, *_tensors(new_state)]:
            assert t.untyped_storage().data_ptr() not in storages
            assert t.size(-2 if t.dim() == 3 else 0) == 5 and t.is_contiguous()
        graphed(torch.randint(0, 13, (6,)), _random_state(m, 6))  # the same bucket, other values
    torch.testing.assert_close(logits, kept[0], atol=0, rtol=0)
    for t, k in zip(_tensors(new_state), kept[1], strict=True):
        torch.testing.assert_close(t, k, atol=0, rtol=0)


def test_a_state_of_another_layout_runs_the_plain_step():
    seen = []

    def step(tokens, state):  # records the batch it is given
        seen.append(tokens.size(0))
        return tokens.float().unsqueeze(1), state

    graphed = GraphedStep(step, max_batch=8, capture=False)
    with torch.inference_mode():
        graphed(torch.zeros(3, dtype=torch.long), [(torch.zeros(1, 3, 16), torch.zeros(1, 3, 16))])
        graphed(torch.zeros(3, dtype=torch.long), [(torch.zeros(1, 3, 8), torch.zeros(1, 3, 8))])
        graphed(torch.zeros(3, dtype=torch.long), [torch.zeros(1, 3, 16)])
        graphed(torch.zeros(3, dtype=torch.long), [(torch.zeros(1, 3, 16), torch.zeros(1, 3, 16))])
    assert seen == [4, 3, 3, 4]  # padded to the bucket only for the layout its buffers were made for


def test_the_engine_through_padded_buckets_generates_the_same_text(tiny_lm):
    def run(engine):
        reqs = {"a": ("ROMEO:", SamplingParams(max_tokens=30, seed=1)),
                "b": ("", SamplingParams(max_tokens=12, temperature=0.0)),
                "c": ("To be", SamplingParams(max_tokens=45, seed=7, top_p=0.9))}
        texts, states = {}, {}

        def collect(outputs):
            for o in outputs:
                texts[o.request_id] = texts.get(o.request_id, "") + o.text
                if o.state is not None:
                    states[o.request_id] = o.state

        for rid, (prompt, params) in reqs.items():
            engine.add(rid, prompt, params, return_state=rid == "c")
            collect(engine.step(3))  # batches of 1, 2 and 3 rows, then shrinking ones as requests finish
        while engine.has_work():
            collect(engine.step(4))
        return texts, states

    plain = LMEngine(tiny_lm.model, tiny_lm.tokenizer, max_batch_size=8)
    padded = LMEngine(tiny_lm.model, tiny_lm.tokenizer, max_batch_size=8)
    padded._step = GraphedStep(padded._step, padded.max_batch_size, capture=False)
    (want, want_states), (got, got_states) = run(plain), run(padded)
    assert sorted(got) == ["a", "b", "c"] and got == want
    for g, w in zip(_tensors(got_states["c"].layers), _tensors(want_states["c"].layers), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_cuda_graphs_change_nothing_on_cpu(tiny_lm):
    e = LMEngine(tiny_lm.model, tiny_lm.tokenizer, cuda_graphs=True)
    assert e.cuda_graphs is False and isinstance(e._step, LSTMStep)


@gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-2)])
def test_graphed_step_equals_eager_on_the_gpu(dtype, tol):
    m = _model(num_layers=3).to("cuda", dtype)
    step = decode_step(m)
    graphed = GraphedStep(step, max_batch=64)
    with torch.inference_mode():
        graphed.warm(lambda b: m.init_state(b, "cuda", dtype), torch.device("cuda"))
        assert all(b.graph is not None for b in graphed._buckets.values()) and not graphed._failed
        for B in (64, 5, 1, 33, 8):
            tokens = torch.randint(0, 13, (B,), device="cuda")
            state = _random_state(m, B, "cuda", dtype)
            _assert_same(graphed(tokens, state), step(tokens, state), atol=tol, rtol=tol)


@gpu
def test_a_replay_after_the_state_was_changed_reads_the_new_state():
    m = _model().to("cuda")
    step = decode_step(m)
    graphed = GraphedStep(step, max_batch=16)
    with torch.inference_mode():
        tokens, state = torch.randint(0, 13, (6,), device="cuda"), _random_state(m, 6, "cuda")
        logits, new_state = graphed(tokens, state)
        first = logits.clone()
        # what the engine does between steps: keep rows, change them in place, step again
        kept = [(h[:, :4] * 0.5, c[:, :4].clone()) for h, c in new_state]
        kept[0][1].add_(1.0)
        tokens2 = torch.randint(0, 13, (4,), device="cuda")
        _assert_same(graphed(tokens2, kept), step(tokens2, kept), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits, first, atol=0, rtol=0)  # the earlier output was not overwritten


@gpu
def test_the_engine_with_cuda_graphs_generates_as_without(tiny_lm_folder):
    from rnnserve.models.folder import load_lm

    loaded = load_lm(tiny_lm_folder, device=torch.device("cuda"), dtype=torch.float32)
    out = {}
    for graphs in (False, True):
        e = LMEngine(loaded.model, loaded.tokenizer, max_batch_size=32, device="cuda", cuda_graphs=graphs)
        assert e.cuda_graphs is graphs
        for i in range(20):
            e.add(str(i), "KING:", SamplingParams(max_tokens=10 + i, temperature=0.0))
        texts = {}
        while e.has_work():
            for o in e.step(4):
                texts[o.request_id] = texts.get(o.request_id, "") + o.text
        out[graphs] = texts
    assert out[True] == out[False]


def _bounded_state(m: RNNLanguageModel, batch: int, device="cpu", dtype=torch.float32):
    """A state as an LSTM makes it: h in [-1, 1] (the int8 step's fixed scale relies on it)."""
    return [(torch.rand_like(h) * 2 - 1, torch.randn_like(c)) for h, c in m.init_state(batch, device, dtype)]


def test_padded_buckets_of_the_int8_step_equal_the_plain_step_bit_for_bit():
    from rnnserve.models.decode import Int8LSTMStep

    torch.set_num_threads(1)
    m = _model(num_layers=3)
    step = Int8LSTMStep(m)
    graphed = GraphedStep(step, max_batch=16, capture=False)
    with torch.inference_mode():
        for B in (8, 5, 1, 3, 7, 16, 2):
            tokens = torch.randint(0, 13, (B,))
            state = _bounded_state(m, B)
            (gl, gs), (wl, ws) = graphed(tokens, state), step(tokens, state)
            assert torch.equal(gl, wl)
            assert all(torch.equal(g, w) for g, w in zip(_tensors(gs), _tensors(ws), strict=True))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_graphed_int8_step_equals_eager_on_the_gpu_bit_for_bit(dtype):
    from rnnserve.models.decode import Int8LSTMStep

    m = _model(num_layers=3).to("cuda", dtype)
    step = Int8LSTMStep(m)
    graphed = GraphedStep(step, max_batch=64)
    with torch.inference_mode():
        graphed.warm(lambda b: m.init_state(b, "cuda", dtype), torch.device("cuda"))
        assert all(b.graph is not None for b in graphed._buckets.values()) and not graphed._failed
        for B in (64, 5, 1, 33, 8):
            tokens = torch.randint(0, 13, (B,), device="cuda")
            state = _bounded_state(m, B, "cuda", dtype)
            (gl, gs), (wl, ws) = graphed(tokens, state), step(tokens, state)
            assert torch.equal(gl, wl)
            assert all(torch.equal(g, w) for g, w in zip(_tensors(gs), _tensors(ws), strict=True))


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_int8_engine_on_the_gpu_is_bit_identical_alone_and_among_255_and_1023_others(dtype):
    from rnnserve.models.folder import load_lm
    from tests.conftest import LM_FOLDER

    loaded = load_lm(LM_FOLDER, device=torch.device("cuda"), dtype=dtype)
    engine = LMEngine(loaded.model, loaded.tokenizer, max_batch_size=1024, device="cuda", cuda_graphs=True,
                      int8=True)

    def run(others: int):
        engine.add("probe", "ROMEO:", SamplingParams(max_tokens=200, temperature=0.9, top_p=0.95, seed=42),
                   logprobs=2)
        for i in range(others):
            engine.add(f"o{i}", ["", "KING:", "To be"][i % 3], SamplingParams(max_tokens=50 + i % 200, seed=i))
        text, lps = "", []
        while engine.has_work():
            for o in engine.step(32):
                if o.request_id == "probe":
                    text += o.text
                    lps += [(e.token, e.logprob, e.top) for e in o.logprobs or []]
        return text, lps

    alone = run(0)
    assert len(alone[0]) == 200
    assert run(255) == alone
    assert run(1023) == alone
