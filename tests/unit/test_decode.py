"""The folded decode step equals stepping the trained modules, for every shape it folds."""
import pytest
import torch

from rnnserve.models.decode import LSTMStep, decode_step
from rnnserve.models.lm import LMConfig, RNNLanguageModel


def _model(cell: str, **kw) -> RNNLanguageModel:
    torch.manual_seed(0)
    m = RNNLanguageModel(LMConfig(vocab_size=13, cell=cell, embed_dim=8, hidden_size=16, **kw)).eval()
    with torch.no_grad():  # trained-looking biases: torch's init would hide a bias folded twice
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m


def _roll(step, m: RNNLanguageModel, tokens: torch.Tensor):
    """Feed tokens (B, T) one step at a time through `step` -> logits (B, T, V), final state."""
    state = m.init_state(tokens.size(0))
    logits = []
    for t in range(tokens.size(1)):
        out, state = step(tokens[:, t], state)
        logits.append(out)
    return torch.stack(logits, 1), state


@pytest.mark.parametrize("layers,residual,table", [(1, False, True), (2, False, True), (3, True, True),
                                                   (3, True, False)])
def test_folded_lstm_step_equals_the_modules(layers, residual, table):
    m = _model("lstm", num_layers=layers, residual=residual)
    step = LSTMStep(m, max_table_bytes=10**9 if table else 0)
    assert (step.table is not None) == table
    tokens = torch.randint(0, 13, (5, 9))
    with torch.inference_mode():
        want_logits, _, want_state = m(tokens)
        got_logits, got_state = _roll(step, m, tokens)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)
    for (gh, gc), (wh, wc) in zip(got_state, want_state, strict=True):
        assert gh.shape == wh.shape == (1, 5, 16)
        torch.testing.assert_close(gh, wh, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gc, wc, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", ["rnn", "gru"])
def test_other_cells_step_through_the_modules(cell):
    m = _model(cell, num_layers=2, residual=True)
    step = decode_step(m)
    assert not isinstance(step, LSTMStep)
    tokens = torch.randint(0, 13, (3, 6))
    with torch.inference_mode():
        want_logits, _, _ = m(tokens)
        got_logits, _ = _roll(step, m, tokens)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layers,residual,table", [(2, False, True), (3, True, False)])
def test_int8_step_stays_close_to_fp32(layers, residual, table):
    from rnnserve.models.decode import Int8LSTMStep

    m = _model("lstm", num_layers=layers, residual=residual)
    assert isinstance(decode_step(m, int8=True), Int8LSTMStep)
    assert not isinstance(decode_step(m), Int8LSTMStep)
    tokens = torch.randint(0, 13, (6, 12))
    limit = 10**9 if table else 0
    with torch.inference_mode():
        want, _ = _roll(LSTMStep(m, limit), m, tokens)
        got, _ = _roll(Int8LSTMStep(m, limit), m, tokens)
    # per-channel int8 weights and int8 activations at fixed scales: close, not equal
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("residual,table", [(False, True), (True, False)])
def test_int8_step_gives_every_row_the_same_bits_in_any_batch(residual, table):
    """Integer products at fixed activation scales: a row's logits and state do not depend on its batch
    (hidden size 16 and vocabulary 13 also put rows where vectorised loops end: a batch's tail)."""
    from rnnserve.models.decode import Int8LSTMStep

    torch.set_num_threads(1)
    m = _model("lstm", num_layers=3, residual=residual)
    step = Int8LSTMStep(m, 10**9 if table else 0)
    torch.manual_seed(1)
    B = 37
    state = [(torch.rand(1, B, 16) * 2 - 1, torch.randn(1, B, 16)) for _ in range(3)]
    tokens = torch.randint(0, 13, (B,))
    with torch.inference_mode():
        logits, new = step(tokens, state)
        for rows in ([5], [0, 5], list(range(3, 20)), [36, 5, 2]):
            index = torch.tensor(rows)
            got, got_state = step(tokens[index], [(h[:, index], c[:, index]) for h, c in state])
            assert torch.equal(got, logits[index])
            for (gh, gc), (h, c) in zip(got_state, new, strict=True):
                assert torch.equal(gh, h[:, index]) and torch.equal(gc, c[:, index])


@pytest.fixture
def int8_gemm(monkeypatch):
    """Build int8 steps with torch._int_mm ("native", oneDNN's int8 kernels) or with fp32 GEMMs ("fp32", for a CPU
    without them), whatever this machine has."""
    from rnnserve.models import decode

    def use(path: str) -> None:
        monkeypatch.setattr(decode, "int8_gemm_native", lambda: path == "native")

    return use


@pytest.mark.parametrize("K", [8, 1040, 1041, 2500])
def test_int8_products_through_fp32_are_int_mm_s_integers(int8_gemm, K):
    """Every operand at +-127, the most a sum can reach: one fp32 block holds K up to 1,040 exactly; longer rows
    add blocks in int32. Both paths give the same int32 integers and the same layer outputs, to the bit."""
    from rnnserve.models.decode import EXACT_FP32_K, Int8Linear

    assert EXACT_FP32_K == 1040
    torch.manual_seed(2)
    N = 19
    w = torch.where(torch.rand(K, N) < 0.5, 1.0, -1.0)  # per-channel scales: every weight quantizes to +-127
    bias = torch.randn(N)
    int8_gemm("native")
    native = Int8Linear(w, bias, 1.0)
    int8_gemm("fp32")
    by_fp32 = Int8Linear(w, bias, 1.0)
    assert native.w_float is None and len(by_fp32.w_float) == -(-K // EXACT_FP32_K)
    x = torch.where(torch.rand(9, K) < 0.5, 1.0, -1.0)
    x[0], x[1] = w[:, 0], -w[:, 0]  # rows whose sums reach +-127^2 K in column 0
    x[2:] *= torch.rand(7, K)  # and ordinary ones
    q = native.quantize(x)
    want = native.acc(q)
    assert want[0, 0] == 127 * 127 * K and want[1, 0] == -127 * 127 * K
    got = by_fp32.acc(q)
    assert got.dtype == torch.int32 and torch.equal(got, want)
    assert torch.equal(by_fp32(x), native(x))
    assert torch.equal(by_fp32(x[3:4]), native(x)[3:4])  # a row alone, the same bits


def test_int8_weights_kept_once_on_a_cpu_without_int8_kernels(int8_gemm):
    """The fp32 path keeps its weights as fp32 only (no unused int8 copy); moved to a GPU, it makes the int8 weights
    the native path holds, from the fp32 integers."""
    from rnnserve.models.decode import Int8Linear

    torch.manual_seed(3)
    w, bias = torch.randn(1100, 21), torch.randn(21)
    int8_gemm("native")
    native = Int8Linear(w, bias, 1.0)
    int8_gemm("fp32")
    by_fp32 = Int8Linear(w, bias, 1.0)
    assert by_fp32.w is None and by_fp32.w_cols is None and native.w_float is None
    assert torch.equal(torch.cat(by_fp32.w_float).to(torch.int8), native.w[:1100, :21])
    assert by_fp32.to(torch.device("cpu")).w is None  # stays on the fp32 path on a CPU
    moved = by_fp32.to(torch.device("meta"))  # any device but the CPU multiplies in int8
    assert moved.w_float is None and moved.w.device.type == "meta"
    assert (moved.w.shape, moved.w.dtype, moved.w_cols.stride()) == (native.w.shape, torch.int8, native.w_cols.stride())


@pytest.mark.parametrize("residual,table", [(False, True), (True, False)])
def test_int8_step_is_the_same_bits_through_fp32_gemms(int8_gemm, residual, table):
    """A CPU without int8 GEMM kernels runs the exact step through fp32 GEMMs: the same logits and states as
    torch._int_mm's, alone and in a batch."""
    from rnnserve.models.decode import Int8LSTMStep

    torch.set_num_threads(1)
    m = _model("lstm", num_layers=3, residual=residual)
    limit = 10**9 if table else 0
    int8_gemm("native")
    native = Int8LSTMStep(m, limit)
    int8_gemm("fp32")
    by_fp32 = Int8LSTMStep(m, limit)
    tokens = torch.randint(0, 13, (21, 10))
    with torch.inference_mode():
        want, want_state = _roll(native, m, tokens)
        got, got_state = _roll(by_fp32, m, tokens)
        alone, _ = _roll(by_fp32, m, tokens[4:5])
    assert torch.equal(got, want) and torch.equal(alone[0], want[4])
    for (gh, gc), (h, c) in zip(got_state, want_state, strict=True):
        assert torch.equal(gh, h) and torch.equal(gc, c)
