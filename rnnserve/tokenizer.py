"""Character tokenizer saved beside the weights as JSON (no pickle).

Characters outside the vocabulary never raise: they map to `unk`, a character of the vocabulary
(a space by default) so that any Unicode prompt can be served.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from rnnserve.models.seq2seq import SPECIALS, UNK


class CharTokenizer:
    def __init__(self, chars: list[str], unk: str = " ") -> None:
        if len(set(chars)) != len(chars):
            raise ValueError("duplicate characters in vocabulary")
        if unk not in chars:
            raise ValueError(f"unk {unk!r} must be in the vocabulary")
        self.chars = list(chars)
        self.unk = unk
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.unk_id = self.stoi[unk]

    @classmethod
    def from_text(cls, text: str, unk: str = " ") -> "CharTokenizer":
        return cls(sorted(set(text)), unk=unk)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(c, self.unk_id) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def unknown(self, text: str) -> set[str]:
        return {c for c in text if c not in self.stoi}

    def to_dict(self) -> dict:
        return {"type": "char", "chars": self.chars, "unk": self.unk}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "CharTokenizer":
        d = json.loads(Path(path).read_text())
        if d.get("type") != "char":
            raise ValueError(f"not a char tokenizer: {path}")
        return cls(d["chars"], unk=d["unk"])


class WordTokenizer:
    """Word vocabulary for translation, over Moses-tokenized lowercased text (rnnserve.text).

    Why words and not subwords: Multi30k's sentences are short and repetitive (the words seen twice
    in train cover 96% of German and 98% of English test tokens), the public references use words,
    and word-level BLEU is then directly comparable. Unknown words map to <unk>.
    """

    def __init__(self, itos: list[str]) -> None:
        if itos[: len(SPECIALS)] != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}")
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, sentences: list[list[str]], min_freq: int = 2) -> "WordTokenizer":
        counts = Counter(w for s in sentences for w in s)
        words = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
        return cls(SPECIALS + words)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, tokens: list[str]) -> list[int]:
        return [self.stoi.get(t, UNK) for t in tokens]

    def decode(self, ids: list[int]) -> list[str]:
        return [self.itos[i] for i in ids]

    def to_dict(self) -> dict:
        return {"type": "word", "itos": self.itos}

    @classmethod
    def from_dict(cls, d: dict) -> "WordTokenizer":
        if d.get("type") != "word":
            raise ValueError("not a word tokenizer")
        return cls(d["itos"])
