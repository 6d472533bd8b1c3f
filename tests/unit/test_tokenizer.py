import pytest

from rnnserve.tokenizer import CharTokenizer


def test_round_trip_of_corpus_text(corpus_chars):
    tok = CharTokenizer(sorted(corpus_chars))
    text = "ROMEO:\nBut soft, what light through yonder window breaks?"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 65


def test_unknown_characters_map_to_unk_and_never_raise():
    tok = CharTokenizer(list("ab "))
    assert tok.encode("a€b\U0001F600\x00") == [0, 2, 1, 2, 2]
    assert tok.unknown("a€b") == {"€"}
    assert tok.encode("") == []


def test_vocabulary_rules():
    with pytest.raises(ValueError, match="duplicate"):
        CharTokenizer(list("aab "))
    with pytest.raises(ValueError, match="unk"):
        CharTokenizer(list("ab"), unk=" ")


def test_save_and_load_json(tmp_path):
    tok = CharTokenizer(list("xyz "), unk="z")
    tok.save(tmp_path / "t.json")
    back = CharTokenizer.load(tmp_path / "t.json")
    assert back.chars == tok.chars and back.unk == "z"
    assert '"type": "char"' in (tmp_path / "t.json").read_text()
