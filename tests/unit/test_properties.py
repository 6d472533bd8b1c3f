"""Property tests: tokenizers and text processing take any Unicode without raising."""
from hypothesis import given, settings
from hypothesis import strategies as st

from rnnserve.engine.sampling import SamplingParams
from rnnserve.text import detokenize, tokenize
from rnnserve.tokenizer import CharTokenizer, WordLMTokenizer

CHARS = CharTokenizer(sorted(set("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?'\n-&$3")))


@given(st.text())
def test_char_tokenizer_encodes_anything_into_the_vocabulary(text):
    ids = CHARS.encode(text)
    assert len(ids) == len(text) and all(0 <= i < CHARS.vocab_size for i in ids)
    known = "".join(c for c in text if c in CHARS.stoi)
    assert CHARS.decode(CHARS.encode(known)) == known


@given(st.text())
@settings(max_examples=300)
def test_moses_tokens_of_anything_are_lowercased_words_and_detokenize(text):
    tokens = tokenize(text)
    assert all(t and " " not in t and t == t.lower() for t in tokens)
    detokenize(tokens)  # never raises


@given(st.lists(st.sampled_from(["the", "cat", "sat", "<eos>", "zebra"]), max_size=20))
def test_word_lm_tokens_round_trip_lines_of_known_words(words):
    vocab = WordLMTokenizer(["<eos>", "the", "cat", "sat"])
    text = " ".join(words).replace(" <eos> ", "\n").replace("<eos>", "\n")
    ids = vocab.encode(text)
    assert vocab.decode(ids).split() == [w for w in text.split() if w != "zebra"]  # unknown words are left out


@given(temperature=st.floats(), top_p=st.floats(), top_k=st.integers(), max_tokens=st.integers())
def test_sampling_params_accept_or_name_the_field(temperature, top_p, top_k, max_tokens):
    p = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    try:
        p.validate(2048)
    except ValueError as e:
        assert str(e).split()[0] in {"max_tokens", "temperature", "top_k", "top_p"}
