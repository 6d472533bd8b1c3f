"""Character tokenizer saved beside the weights as JSON (no pickle).

Characters outside the vocabulary never raise: they map to `unk`, a character of the vocabulary
(a space by default) so that any Unicode prompt can be served.
"""
from __future__ import annotations

import json
from pathlib import Path


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

    def decoder(self, line_start: bool = False) -> "CharDecoder":
        return CharDecoder(self.chars)

    def token_text(self, token: int) -> str:
        """One token as text, on its own (logprobs name tokens this way)."""
        return self.chars[token]

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


class CharDecoder:
    """Text of generated tokens, one token at a time (every tokenizer of a language model has one)."""

    def __init__(self, chars: list[str]) -> None:
        self.chars = chars

    def add(self, token: int) -> str:
        return self.chars[token]


class WordLMTokenizer:
    """A word vocabulary for language models, as PyTorch's word_language_model example builds it: words
    split on whitespace and `<eos>` at the end of every line. A word outside the vocabulary becomes
    `<unk>` when the vocabulary has it (WikiText's does), and is left out otherwise."""

    EOS = "<eos>"

    def __init__(self, words: list[str]) -> None:
        if len(set(words)) != len(words):
            raise ValueError("duplicate words in vocabulary")
        if self.EOS not in words:
            raise ValueError(f"the vocabulary needs {self.EOS!r}, the end of a line")
        self.words = list(words)
        self.stoi = {w: i for i, w in enumerate(self.words)}
        self.unk_id = self.stoi.get("<unk>")

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        lines = text.split("\n")
        ids: list[int] = []
        for i, line in enumerate(lines):
            for w in line.split():
                token = self.stoi.get(w, self.unk_id)
                if token is not None:
                    ids.append(token)
            if i < len(lines) - 1:
                ids.append(self.stoi[self.EOS])
        return ids

    def decode(self, ids: list[int]) -> str:
        d = self.decoder(line_start=True)
        return "".join(d.add(i) for i in ids)

    def decoder(self, line_start: bool = False) -> "WordDecoder":
        return WordDecoder(self.words, line_start)

    def token_text(self, token: int) -> str:
        return "\n" if self.words[token] == self.EOS else self.words[token]

    def to_dict(self) -> dict:
        return {"type": "words", "words": self.words}

    @classmethod
    def from_dict(cls, d: dict) -> "WordLMTokenizer":
        if d.get("type") != "words":
            raise ValueError("not a word tokenizer")
        return cls(d["words"])


class WordDecoder:
    def __init__(self, words: list[str], line_start: bool = False) -> None:
        self.words, self.line_start = words, line_start

    def add(self, token: int) -> str:
        word = self.words[token]
        if word == WordLMTokenizer.EOS:
            self.line_start = True
            return "\n"
        text = word if self.line_start else " " + word
        self.line_start = False
        return text
