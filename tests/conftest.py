"""Shared fixtures: the committed model folders and a small random model for fast unit tests."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from rnnserve.models.folder import load_lm, save_lm
from rnnserve.models.lm import LMConfig, RNNLanguageModel
from rnnserve.paths import DATA_DIR, MODELS_DIR
from rnnserve.tokenizer import CharTokenizer

# no test may depend on the machine's speed: Hypothesis' 200 ms deadline per example and its
# too-slow health check do
settings.register_profile("rnnserve", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("rnnserve")

SHAKESPEARE = DATA_DIR / "tinyshakespeare" / "input.txt"

LM_FOLDER = MODELS_DIR / "lm-shakespeare"


@pytest.fixture(scope="session")
def corpus_chars() -> set[str]:
    return set(SHAKESPEARE.read_text())


@pytest.fixture(scope="session")
def tiny_lm_folder(tmp_path_factory) -> Path:
    """A small random LSTM with the real vocabulary: fast, and loads through the real folder code."""
    torch.manual_seed(0)
    tok = CharTokenizer.from_text(SHAKESPEARE.read_text())
    model = RNNLanguageModel(LMConfig(vocab_size=tok.vocab_size, embed_dim=16, hidden_size=32, num_layers=2))
    return save_lm(tmp_path_factory.mktemp("tiny") / "tiny-lm", model, tok, meta={"name": "tiny-lm"})


@pytest.fixture(scope="session")
def tiny_lm(tiny_lm_folder):
    return load_lm(tiny_lm_folder)


@pytest.fixture(scope="session")
def tiny_translation_folder(tmp_path_factory) -> Path:
    """A small random GRU encoder-decoder with SentencePiece vocabularies learnt from Multi30k's raw val set."""
    from rnnserve.models.folder import save_translation
    from rnnserve.models.seq2seq import EOS, Seq2Seq, Seq2SeqConfig
    from rnnserve.subword import SubwordTokenizer
    from rnnserve.training.corpus import read_lines

    raw = DATA_DIR / "multi30k" / "raw"
    src_tok = SubwordTokenizer.train(read_lines(raw / "val.de.gz"), 400)
    tgt_tok = SubwordTokenizer.train(read_lines(raw / "val.en.gz"), 400)
    torch.manual_seed(0)
    model = Seq2Seq(Seq2SeqConfig(src_vocab=src_tok.vocab_size, tgt_vocab=tgt_tok.vocab_size, embed_dim=16,
                                  enc_hidden=12, dec_hidden=20, attn_dim=8, enc_layers=1))
    model.decoder.out.bias.data[EOS] = -30.0  # runs to max_tokens, so lengths are known in tests
    return save_translation(tmp_path_factory.mktemp("tiny") / "tiny-tr", model, src_tok, tgt_tok,
                            meta={"name": "tiny-tr", "languages": {"source": "de", "target": "en"}})
