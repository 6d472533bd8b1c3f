"""SentencePiece tokenizers: cased round trips, Unicode as SentencePiece normalizes it, no <unk>."""
import functools
import gzip

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rnnserve.models.seq2seq import UNK
from rnnserve.paths import DATA_DIR
from rnnserve.service.handlers.frames import TextStreams
from rnnserve.subword import SubwordLMTokenizer, SubwordTokenizer


def lines(name: str, n: int = 3000) -> list[str]:
    with gzip.open(DATA_DIR / "multi30k" / "raw" / name, "rt", encoding="utf-8") as f:
        return f.read().splitlines()[:n]


@pytest.fixture(scope="module")
def fr() -> SubwordTokenizer:
    return SubwordTokenizer.train(lines("train.fr.gz"), 1000)


@pytest.fixture(scope="module")
def de() -> SubwordTokenizer:
    return SubwordTokenizer.train(lines("train.de.gz"), 1000)


def test_cased_text_round_trips_with_accents_and_sharp_s(fr, de):
    for tok, text in ((fr, "Une femme âgée, à l'école, mange des crêpes."), (de, "Ich habe das Fußballspiel gesehen."),
                      (de, "Zwei Männer überqueren die Straße.")):
        ids = tok.encode(text)
        assert UNK not in ids and tok.decode(ids) == text


def test_unicode_is_normalized_the_way_sentencepiece_does(fr):
    # NFKC: French typography's narrow no-break space before a colon becomes a plain space
    text = "Regardez\u202f: un chien\u00a0!"
    assert tok_round_trip(fr, text) == "Regardez : un chien !" == fr.normalize(text)


def tok_round_trip(tok, text):
    return tok.decode(tok.encode(text))


@functools.lru_cache(maxsize=1)
def small_de() -> SubwordTokenizer:
    return SubwordTokenizer.train(lines("train.de.gz", 2000), 600)


@given(st.text(max_size=40))
@settings(max_examples=200, deadline=None)
def test_any_text_encodes_without_unk_thanks_to_byte_fallback(text):
    tok = small_de()
    ids = tok.encode(text)
    assert UNK not in ids
    assert tok.decode(ids) == tok.normalize(text).strip(" ")  # lossless up to normalization


def test_saved_in_sentencepiece_format_and_loaded_back(fr, tmp_path):
    import sentencepiece as spm

    fr.save(tmp_path / "source.model")
    plain = spm.SentencePieceProcessor(model_file=str(tmp_path / "source.model"))  # the library reads it alone
    back = SubwordTokenizer.load(tmp_path / "source.model")
    text = "Deux chiens jouent dans la neige."
    assert back.encode(text) == fr.encode(text) == plain.encode(text)


def test_streamed_text_extends_and_ends_as_the_whole(de):
    ids = de.encode("Öffentliche Straßenbahn für 10 € 😀 heute.")
    streams = TextStreams(de, 1)
    sent = "".join(streams.add(0, [i]) for i in ids)
    assert streams.final(0) == "Öffentliche Straßenbahn für 10 € 😀 heute."
    assert streams.final(0).startswith(sent) and "\ufffd" not in sent


def test_language_model_tokens_keep_line_breaks():
    tok = SubwordLMTokenizer.train("ROMEO:\nBut soft, what light?\n\nJULIET:\nAy me!\n" * 50, 300)
    text = "ROMEO:\nAy me, what light?\n\nJULIET:\nBut soft!"
    assert tok.decode(tok.encode(text)) == text
    d = tok.decoder(line_start=False)  # continuing "ROMEO: But": the next word needs its space
    assert "".join(d.add(i) for i in tok.encode("\nsoft")).startswith("\nsoft")
