"""Property tests: tokenizers and text processing take any Unicode without raising."""
from hypothesis import given, settings
from hypothesis import strategies as st

from rnnserve.engine.sampling import SamplingParams
from rnnserve.text import detokenize, tokenize
from rnnserve.tokenizer import CharTokenizer, WordTokenizer

CHARS = CharTokenizer(sorted(set("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?'\n-&$3")))


@given(st.text())
def test_char_tokenizer_encodes_anything_into_the_vocabulary(text):
    ids = CHARS.encode(text)
    assert len(ids) == len(text) and all(0 <= i < CHARS.vocab_size for i in ids)
    known = "".join(c for c in text if c in CHARS.stoi)
    assert CHARS.decode(CHARS.encode(known)) == known


@given(st.text())
@settings(max_examples=300)
def test_tokenize_anything_and_words_map_into_the_vocabulary(text):
    tokens = tokenize(text)
    assert all(t and " " not in t and t == t.lower() for t in tokens)
    assert tokenize(" ".join(tokens)) == tokens  # idempotent on its own output
    vocab = WordTokenizer.build([tokens, tokens], min_freq=1)
    assert vocab.decode(vocab.encode(tokens)) == tokens
    detokenize(tokens)  # never raises


@given(temperature=st.floats(), top_p=st.floats(), top_k=st.integers(), max_tokens=st.integers())
def test_sampling_params_accept_or_name_the_field(temperature, top_p, top_k, max_tokens):
    p = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    try:
        p.validate(2048)
    except ValueError as e:
        assert str(e).split()[0] in {"max_tokens", "temperature", "top_k", "top_p"}
