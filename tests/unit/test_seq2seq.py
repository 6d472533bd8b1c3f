import gzip
import math

import pytest
import torch

from rnnserve.engine.beam import beam_search
from rnnserve.models.seq2seq import BOS, EOS, PAD, Seq2Seq, Seq2SeqConfig
from rnnserve.paths import DATA_DIR
from rnnserve.text import detokenize, tokenize
from rnnserve.training.translation import to_batch


def tiny(cell="gru", seed=0):
    torch.manual_seed(seed)
    return Seq2Seq(Seq2SeqConfig(src_vocab=30, tgt_vocab=25, cell=cell, embed_dim=16, enc_hidden=12,
                                 dec_hidden=20, attn_dim=10, enc_layers=2, dropout=0.0)).eval()


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_loss_is_near_uniform_at_start_and_shapes(cell):
    m = tiny(cell)
    src, src_len, tgt = to_batch([([5, 6, 7], [4, 5]), ([8, 9], [6, 7, 8, 9])])
    logits, loss = m(src, src_len, tgt)
    assert logits.shape == (2, 5, 25)
    assert abs(loss.item() - math.log(25)) < 0.3


def test_padding_never_leaks_into_results():
    """A sentence decodes the same alone and beside a longer one (packed encoder, masked attention)."""
    m = tiny()
    alone = to_batch([([5, 6, 7], [4])])
    padded = to_batch([([5, 6, 7], [4]), ([9, 10, 11, 12, 13, 14, 15], [4])])
    a = beam_search(m, alone[0], alone[1], beam_size=3, max_len=8, return_attention=True)[0]
    b = beam_search(m, padded[0], padded[1], beam_size=3, max_len=8, return_attention=True)[0]
    assert a.tokens == b.tokens and a.score == pytest.approx(b.score, abs=1e-4)
    assert all(len(row) == 3 for row in b.attention)  # weights over the 3 real source tokens only
    assert all(sum(row) == pytest.approx(1.0, abs=1e-4) for row in b.attention)


def test_teacher_forced_fast_path_equals_step_by_step():
    m = tiny()
    src, src_len, tgt = to_batch([([5, 6, 7], [4, 5, 6]), ([8, 9], [6, 7])])
    fast, _ = m(src, src_len, tgt, teacher_forcing=1.0)
    enc, keys, mask, state = m.encode(src, src_len)
    steps = []
    for t in range(tgt.size(1) - 1):
        logits, state, _ = m.decoder.step(tgt[:, t], state, keys, enc, mask)
        steps.append(logits)
    torch.testing.assert_close(fast, torch.stack(steps, 1), atol=1e-5, rtol=1e-5)


def greedy_by_hand(m, src_ids, max_len):
    src, src_len, _ = to_batch([(src_ids, [])])
    enc, keys, mask, state = m.encode(src, src_len)
    prev, out, logp = torch.tensor([BOS]), [], 0.0
    for _ in range(max_len):
        logits, state, _ = m.decoder.step(prev, state, keys, enc, mask)
        lp = torch.log_softmax(logits, -1)
        prev = lp.argmax(-1)
        logp += lp[0, prev].item()
        if prev.item() == EOS:
            break
        out.append(prev.item())
    return out, logp


def test_beam_of_one_is_greedy_and_wider_beams_score_at_least_as_well():
    m = tiny(seed=3)
    for src_ids in ([5, 6, 7, 8], [12, 3, 9]):
        want, want_lp = greedy_by_hand(m, src_ids, 10)
        src, src_len, _ = to_batch([(src_ids, [])])
        g = beam_search(m, src, src_len, beam_size=1, max_len=10)[0]
        assert g.tokens == want and g.score == pytest.approx(want_lp, abs=1e-4)
        b = beam_search(m, src, src_len, beam_size=8, max_len=10, alpha=0.0)[0]
        assert b.score >= g.score - 1e-5
        assert PAD not in b.tokens and EOS not in b.tokens


def test_text_processing_matches_multi30k_preprocessing():
    """Raw test sentences tokenize exactly as Multi30k's Moses pipeline did."""
    for lang in ("de", "en"):
        with gzip.open(DATA_DIR / "multi30k" / "raw" / f"test_2016_flickr.{lang}.gz", "rt") as f:
            raw = f.read().splitlines()
        tok = (DATA_DIR / "multi30k" / "tok" / f"test_2016_flickr.lc.norm.tok.{lang}").read_text().splitlines()
        assert [" ".join(tokenize(r, lang)) for r in raw] == tok


def test_tokenize_and_detokenize():
    assert tokenize("Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt.") == \
        "ein mann mit einem orangefarbenen hut , der etwas anstarrt .".split()
    assert tokenize("A man's \"big\" dog.") == ["a", "man", "&apos;s", "&quot;", "big", "&quot;", "dog", "."]
    assert detokenize("a man &apos;s &quot; big &quot; dog ( maybe ) .".split()) == 'a man\'s "big" dog (maybe).'
    assert tokenize("") == [] and tokenize("   \n") == []
