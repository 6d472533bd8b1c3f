"""Moses-style tokenization for the translation models, close to Multi30k's own preprocessing.

The training files were lowercased, punctuation-normalised and tokenised with Moses'
tokenizer.perl, which also escapes ' " & as &apos; &quot; &amp;. Raw text from clients goes
through the same steps here so that it meets the vocabulary the model was trained on; output
tokens go back to readable text with `detokenize`.
"""
from __future__ import annotations

import html
import re
import unicodedata

_SPLIT = re.compile(r'(\.\.\.|[!?;:()\[\]"„“”«»…]|(?<!\d),|,(?!\d))')
# Moses keeps the period of these words (and of words with an inner period, e.g. "e.s.e.")
# unless the word ends the sentence
_NONBREAKING = {"ca", "usw", "bzw", "st", "dr", "mr", "mrs", "ms", "nr", "vs", "etc", "jr", "sr", "z.b"}
_APOSTROPHE = re.compile(r"(\w)'(\w)")
_ESCAPES = {"&": "&amp;", "'": "&apos;", '"': "&quot;", "<": "&lt;", ">": "&gt;", "[": "&#91;", "]": "&#93;",
            "|": "&#124;"}
_QUOTES = str.maketrans({"„": '"', "“": '"', "”": '"', "«": '"', "»": '"', "‘": "'", "’": "'", "`": "'"})


def tokenize(text: str) -> list[str]:
    """Raw or already Moses-tokenized text -> lowercased, escaped tokens (idempotent on Multi30k's files)."""
    text = unicodedata.normalize("NFC", html.unescape(text)).translate(_QUOTES).lower()
    text = " ".join(text.split())
    text = _APOSTROPHE.sub(r"\1 '\2", text)  # man's -> man 's ; don't -> don 't (Moses' English rule)
    words = _SPLIT.sub(r" \1 ", text).split()
    tokens: list[str] = []
    for i, w in enumerate(words):
        if len(w) > 1 and w.endswith(".") and w != "..." and not (
                i < len(words) - 1 and ("." in w[:-1] or w[:-1] in _NONBREAKING)):
            tokens += [w[:-1], "."]
        else:
            tokens.append(w)
    return ["".join(_ESCAPES.get(ch, ch) for ch in tok) for tok in tokens]


_NO_SPACE_BEFORE = {".", ",", "!", "?", ";", ":", ")", "]", "..."}
_NO_SPACE_AFTER = {"(", "["}


def detokenize(tokens: list[str]) -> str:
    out = ""
    quote_open = False
    for tok in (html.unescape(t) for t in tokens):
        if tok == '"':
            glue_left = quote_open
            quote_open = not quote_open
        else:
            glue_left = tok in _NO_SPACE_BEFORE or tok.startswith("'")
        if out and not glue_left and not out.endswith(tuple(_NO_SPACE_AFTER)) and not (
                out.endswith('"') and quote_open and tok != '"'):
            out += " "
        out += tok
    return out
