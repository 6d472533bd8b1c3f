"""Moses preprocessing through sacremoses: lowercased, punctuation-normalised, tokenized and escaped
text, the format of Multi30k's published tokenized files (scripts/task1-tokenize.sh there), which
sacremoses reproduces exactly on the test sets.

Used for the second BLEU figure of `rnnserve evaluate` (lowercased and tokenized, comparable with
published Multi30k results) and by models with a word vocabulary over such tokens.
"""
from __future__ import annotations

import html
from functools import lru_cache

from sacremoses import MosesDetokenizer, MosesPunctNormalizer, MosesTokenizer


@lru_cache(maxsize=16)
def _moses(lang: str) -> tuple[MosesPunctNormalizer, MosesTokenizer, MosesDetokenizer]:
    return MosesPunctNormalizer(lang=lang), MosesTokenizer(lang=lang), MosesDetokenizer(lang=lang)


def tokenize(text: str, lang: str = "en") -> list[str]:
    """Raw or already tokenized text -> lowercased, escaped Moses tokens (idempotent on its own output)."""
    normalizer, tokenizer, _ = _moses(lang)
    text = html.unescape(" ".join(text.split())).lower()
    if not text:
        return []
    return tokenizer.tokenize(normalizer.normalize(text), escape=True)


def detokenize(tokens: list[str], lang: str = "en") -> str:
    return _moses(lang)[2].detokenize(tokens, unescape=True)


def lowercase_tokenized(text: str, lang: str = "en") -> str:
    return " ".join(tokenize(text, lang))
