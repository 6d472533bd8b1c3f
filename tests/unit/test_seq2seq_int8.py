"""The translation decoder's exact int8 step (models/seq2seq_decode.py): a row's logits, state and attention are
the same bits alone and inside batches of random companions of other source lengths, they stay close to
fp32, and the engine's translations through it are the same alone and in any batch."""
import random

import pytest
import torch

from rnnserve.engine.lm_engine import mkldnn_enabled
from rnnserve.engine.translation_engine import TranslationEngine, TranslationParams
from rnnserve.models.seq2seq import Seq2Seq, Seq2SeqConfig
from rnnserve.models.seq2seq_decode import Int8GRUDecoderStep, Int8GRUEncoder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # what the handlers run (several threads split element-wise loops by batch size)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shipped():
    from rnnserve.models.folder import load_translation
    from rnnserve.paths import MODELS_DIR

    return load_translation(MODELS_DIR / "translate-de-en").model


def tiny(cell: str = "gru") -> Seq2Seq:
    torch.manual_seed(3)  # sizes that are not multiples of a vector's width: every loop has a tail
    return Seq2Seq(Seq2SeqConfig(src_vocab=50, tgt_vocab=37, cell=cell, embed_dim=13, enc_hidden=11, dec_hidden=21,
                                 attn_dim=9, enc_layers=1, dropout=0.0)).eval()


def _encoded(model: Seq2Seq, src: list[int]):
    """One sentence encoded alone, as the int8 engine encodes it."""
    return model.encode(torch.tensor([src]), torch.tensor([len(src)]))


def _batch(model: Seq2Seq, sentences: list[list[int]], prevs: list[int]):
    """The rows of several sentences as the int8 engine holds them: each encoded alone, right-padded to the
    longest."""
    parts = [_encoded(model, s) for s in sentences]
    S = max(len(s) for s in sentences)
    pad = [S - len(s) for s in sentences]
    enc = torch.cat([torch.nn.functional.pad(p[0], (0, 0, 0, n)) for p, n in zip(parts, pad)])
    keys = torch.cat([torch.nn.functional.pad(p[1], (0, 0, 0, n)) for p, n in zip(parts, pad)])
    mask = torch.cat([torch.nn.functional.pad(p[2], (0, n), value=False) for p, n in zip(parts, pad)])
    state = torch.cat([p[3] for p in parts]) + 0.0
    return torch.tensor(prevs), state, keys, enc, mask


@pytest.mark.parametrize("name,table", [("tiny", True), ("tiny", False), ("shipped", True)])
@torch.inference_mode()
def test_a_rows_logits_state_and_attention_are_the_same_bits_alone_and_among_random_companions(name, table, shipped):
    model = tiny() if name == "tiny" else shipped
    step = Int8GRUDecoderStep(model.decoder, max_table_bytes=2**30 if table else 0)
    assert (step.table is not None) == table
    V, src_vocab = model.config.tgt_vocab, model.config.src_vocab
    rng = random.Random(5)
    probe, prev = [rng.randrange(4, src_vocab) for _ in range(7)], rng.randrange(4, V)
    with mkldnn_enabled(True):
        want = step(*_batch(model, [probe], [prev]))
        query = step.q_h(want[1])[:, 3 * step.hidden:]
        want_context = step._attend(query, *_batch(model, [probe], [prev])[2:])[0]
        # the state after a step is also a row's own: step twice
        want2 = step(torch.tensor([prev]), want[1], *_batch(model, [probe], [prev])[2:])
        for trial in range(12):
            n = rng.choice([1, 2, 5, 9, 16, 33, 70])
            longest = rng.choice([7, 30, 40, 70])
            others = [[rng.randrange(4, src_vocab) for _ in range(rng.randint(1, longest))] for _ in range(n)]
            at = rng.randint(0, n)
            sentences = others[:at] + [probe] + others[at:]
            prevs = [rng.randrange(4, V) for _ in range(n)]
            prevs.insert(at, prev)
            batch = _batch(model, sentences, prevs)
            logits, state, weights = step(*batch)
            assert torch.equal(logits[at], want[0][0]), trial
            assert torch.equal(state[at], want[1][0]), trial
            assert torch.equal(weights[at, : len(probe)], want[2][0, : len(probe)]), trial
            assert not weights[at, len(probe):].any()  # padding gets no attention
            query = step.q_h(state)[:, 3 * step.hidden:]
            assert torch.equal(step._attend(query, *batch[2:])[0][at], want_context[0]), trial
            logits2, _, _ = step(batch[0], state, *batch[2:])
            assert torch.equal(logits2[at], want2[0][0]), trial


@torch.inference_mode()
def test_int8_stays_close_to_fp32(shipped):
    step = Int8GRUDecoderStep(shipped.decoder)
    torch.manual_seed(0)
    sentences = [torch.randint(4, 8000, (int(n),)).tolist() for n in torch.randint(3, 25, (48,))]
    prevs = torch.randint(4, 8000, (48,)).tolist()
    batch = _batch(shipped, sentences, prevs)
    with mkldnn_enabled(True):
        l8, s8, w8 = step(*batch)
    l32, s32, w32 = shipped.decoder.step(*batch)
    lp8, lp32 = torch.log_softmax(l8, -1), torch.log_softmax(l32, -1)
    assert (lp8 - lp32).abs().max() < 0.25  # measured 0.05-0.1 on these weights
    assert (s8 - s32).abs().max() < 0.1  # states in [-1, 1]; measured ~0.02
    assert (w8 - w32).abs().max() < 0.05
    assert (l8.argmax(-1) == l32.argmax(-1)).float().mean() >= 0.9


def _translate(engine: TranslationEngine) -> dict:
    out = {}
    while engine.has_work():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = [(r.tokens, r.score, r.finish_reason,
                                      [(h.tokens, h.logprob, h.score) for h in r.hypotheses or []], r.attention)
                                     for r in o.results]
    return out


@pytest.mark.parametrize("name", ["tiny", "shipped"])
def test_translations_through_the_int8_engine_are_the_same_bits_alone_and_in_random_batches(name, shipped):
    model = tiny() if name == "tiny" else shipped
    V, src_vocab = model.config.tgt_vocab, model.config.src_vocab
    rng = random.Random(9)

    def probe():
        src = [rng.randrange(4, src_vocab) for _ in range(rng.randint(1, 12))]
        K = rng.choice([1, 2, 4, 5])
        return src, TranslationParams(beam_size=K, n_best=rng.randint(1, K), max_tokens=rng.choice([None, 4, 9]),
                                      return_attention=rng.random() < 0.3), (
            [[rng.randrange(4, V) for _ in range(rng.randint(1, 3))]] if rng.random() < 0.2 else None)

    probes = [probe() for _ in range(6 if name == "tiny" else 3)]
    alone = {}
    for i, (src, params, prefix) in enumerate(probes):
        engine = TranslationEngine(model, max_rows=64, int8=True)
        assert engine.int8
        engine.add(f"p{i}", [src], params, prefix)
        alone.update(_translate(engine))
    for trial in range(2 if name == "tiny" else 1):
        engine = TranslationEngine(model, max_rows=64, int8=True)
        pending = [(f"p{i}", p) for i, p in enumerate(probes)]
        rng.shuffle(pending)
        out, companions = {}, 0
        while pending or engine.has_work():
            # random companions, random arrivals, past the rows (queued)
            for _ in range(rng.randint(0, 4) if companions < 40 else 0):
                src, params, prefix = probe()
                texts = [src, src[::-1]] if rng.random() < 0.3 else [src]
                engine.add(f"c{companions}", texts, params, prefix * len(texts) if prefix else None)
                companions += 1
            if pending and rng.random() < 0.5:
                rid, (src, params, prefix) = pending.pop()
                engine.add(rid, [src], params, prefix)
            for o in engine.step():
                if o.finished:
                    out[o.request_id] = [(r.tokens, r.score, r.finish_reason,
                                          [(h.tokens, h.logprob, h.score) for h in r.hypotheses or []], r.attention)
                                         for r in o.results]
        for i in range(len(probes)):
            assert out[f"p{i}"] == alone[f"p{i}"], (trial, i)


def _encode_rows(enc8: Int8GRUEncoder, sentences: list[list[int]]):
    S = max(len(x) for x in sentences)
    src = torch.zeros(len(sentences), S, dtype=torch.long)
    for i, x in enumerate(sentences):
        src[i, : len(x)] = torch.tensor(x)
    with mkldnn_enabled(True):
        return enc8(src, torch.tensor([len(x) for x in sentences]))


@pytest.mark.parametrize("name,layers,table", [("tiny", 1, True), ("tiny", 2, False), ("shipped", 2, True)])
@torch.inference_mode()
def test_a_sentence_encodes_to_the_same_bits_alone_and_among_random_companions(name, layers, table, shipped):
    if name == "tiny":
        torch.manual_seed(3)
        model = Seq2Seq(Seq2SeqConfig(src_vocab=50, tgt_vocab=37, cell="gru", embed_dim=13, enc_hidden=11,
                                      dec_hidden=21, attn_dim=9, enc_layers=layers, dropout=0.0)).eval()
    else:
        model = shipped
    enc8 = Int8GRUEncoder(model, max_table_bytes=1 << 30 if table else 0)
    rng = random.Random(7)
    V = model.config.src_vocab
    one = [rng.randrange(4, V) for _ in range(9)]
    alone = _encode_rows(enc8, [one])
    for _ in range(4):
        others = [[rng.randrange(4, V) for _ in range(rng.randint(1, 17))] for _ in range(rng.randint(1, 40))]
        at = rng.randrange(len(others) + 1)
        batch = _encode_rows(enc8, others[:at] + [one] + others[at:])
        enc, keys, mask, state = batch  # padding past the sentence aside
        assert torch.equal(alone[0][0], enc[at, :9]) and torch.equal(alone[1][0], keys[at, :9])
        assert torch.equal(alone[2][0], mask[at, :9]) and torch.equal(alone[3][0], state[at])
        assert not batch[2][at, 9:].any() and not batch[0][at, 9:].any()  # padding: masked, zero annotations
    src, lengths = torch.tensor([one]), torch.tensor([9])
    ref = model.encode(src, lengths)
    assert (ref[0] - alone[0]).abs().max() < 0.05 and (ref[3] - alone[3]).abs().max() < 0.05  # close to fp32


def test_int8_is_a_cpu_gru_path_and_falls_back_elsewhere():
    assert TranslationEngine(tiny(), int8=True).int8
    assert not TranslationEngine(tiny(), int8=False).int8
    assert not TranslationEngine(tiny(), int8=True, device="meta").int8  # a GPU keeps its path
    assert not TranslationEngine(tiny("lstm"), int8=True).int8  # an LSTM decoder keeps the fp32 step
    with pytest.raises(ValueError, match="needs a GRU decoder"):
        Int8GRUDecoderStep(tiny("lstm").decoder)


@torch.inference_mode()
def test_the_encoder_and_decoder_step_are_the_same_bits_through_fp32_gemms(monkeypatch):
    """A CPU without int8 GEMM kernels runs the int8 translation steps through fp32 GEMMs (models/decode.py): the
    same annotations, states, logits and attention as torch._int_mm's."""
    from rnnserve.models import decode

    model = tiny()
    built = {}
    for path in ("native", "fp32"):
        monkeypatch.setattr(decode, "int8_gemm_native", lambda path=path: path == "native")
        built[path] = (Int8GRUEncoder(model), Int8GRUDecoderStep(model.decoder))
    assert built["native"][1].q_h.w_float is None and built["fp32"][1].q_h.w_float is not None
    rng = random.Random(11)
    sentences = [[rng.randrange(4, 50) for _ in range(rng.randint(1, 12))] for _ in range(6)]
    prevs = [rng.randrange(4, 37) for _ in sentences]
    outs = {}
    for path, (enc8, step) in built.items():
        encoded = _encode_rows(enc8, sentences)
        _, state, keys, enc, mask = _batch(model, sentences, prevs)
        with mkldnn_enabled(True):
            outs[path] = encoded, step(torch.tensor(prevs), state, keys, enc, mask)
    for want, got in zip(outs["native"], outs["fp32"], strict=True):
        for a, b in zip(want, got, strict=True):
            assert torch.equal(a, b)
