"""Subword tokenization with SentencePiece, trained on the user's own text and saved in SentencePiece's
own format (a `.model` protobuf: data, never code) beside the weights.

Cased, raw text goes in and comes back out: SentencePiece normalizes Unicode (NFKC: French's narrow
no-break spaces become spaces, ligatures and full-width forms their plain letters), treats the
space as a symbol, and decodes to detokenized text. `byte_fallback` spells a character the model
never saw as its UTF-8 bytes, so ordinary input never meets `<unk>`.

Ids 0-3 are <pad>, <unk>, <bos>, <eos>, the ids the models use (rnnserve.models.seq2seq).
"""
from __future__ import annotations

import codecs
import io
import re
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from rnnserve.models.seq2seq import BOS, EOS, PAD, UNK

MODEL_TYPES = ("unigram", "bpe")


class VocabularyTooSmall(ValueError):
    """The vocabulary asked for cannot hold the text's characters, the 256 byte pieces and the special tokens."""

    def __init__(self, asked: int, minimum: int) -> None:
        super().__init__(f"a vocabulary of {asked} pieces is too small: this text needs at least {minimum} (each of "
                         f"its characters, 256 byte pieces and the special tokens)")
        self.asked, self.minimum = asked, minimum


class SubwordTokenizer:
    def __init__(self, proto: bytes) -> None:
        self.proto = proto
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        if (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) != (PAD, UNK, BOS, EOS):
            raise ValueError("a SentencePiece model for rnnserve numbers <pad> <unk> <bos> <eos> as 0 1 2 3")

    @classmethod
    def train(cls, lines: Iterable[str], vocab_size: int, model_type: str = "unigram",
              character_coverage: float = 1.0, seed_sentences: int = 2_000_000) -> "SubwordTokenizer":
        """Learn a vocabulary of at most `vocab_size` pieces from the lines (held in memory)."""
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}")
        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(list(lines)), model_writer=buf, model_type=model_type, vocab_size=vocab_size,
                character_coverage=character_coverage, byte_fallback=True, pad_id=PAD, unk_id=UNK, bos_id=BOS,
                eos_id=EOS, normalization_rule_name="nmt_nfkc", input_sentence_size=seed_sentences,
                shuffle_input_sentence=True, hard_vocab_limit=False, minloglevel=2, num_threads=1,
                max_sentence_length=1 << 16)
        except RuntimeError as e:  # SentencePiece says "... smaller than required_chars. 300 vs 321 ..."
            small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(e))
            if small is None:
                raise
            raise VocabularyTooSmall(vocab_size, int(small.group(2))) from None
        return cls(buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> "SubwordTokenizer":
        return cls(Path(path).read_bytes())

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.proto)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i not in (PAD, BOS, EOS)])

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.sp.id_to_piece(i) for i in ids]

    def normalize(self, text: str) -> str:
        """The text as the model reads it (SentencePiece's normalization), for comparisons."""
        return self.sp.normalize(text).replace("\u2581", " ").strip(" ")


class SubwordLMTokenizer:
    """SentencePiece for a language model: each line of text is a sentence and `<eos>` ends it, so the
    model learns line breaks (SentencePiece itself treats a newline as a space)."""

    def __init__(self, sp: SubwordTokenizer) -> None:
        self.sp = sp

    @classmethod
    def train(cls, text: str, vocab_size: int, model_type: str = "unigram") -> "SubwordLMTokenizer":
        return cls(SubwordTokenizer.train((line for line in text.split("\n") if line.strip()), vocab_size,
                                          model_type))

    @classmethod
    def load(cls, path: str | Path) -> "SubwordLMTokenizer":
        return cls(SubwordTokenizer.load(path))

    def save(self, path: str | Path) -> None:
        self.sp.save(path)

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size

    def encode(self, text: str) -> list[int]:
        lines = text.split("\n")
        ids: list[int] = []
        for i, line in enumerate(lines):
            ids += self.sp.encode(line) if line else []
            if i < len(lines) - 1:
                ids.append(EOS)
        return ids

    def decode(self, ids: list[int]) -> str:
        d = self.decoder(line_start=True)
        return "".join(d.add(i) for i in ids) + d.flush()

    def decoder(self, line_start: bool = False) -> "SubwordDecoder":
        """line_start: the text so far is empty or ends a line (no space before the first word)."""
        return SubwordDecoder(self.sp.sp, line_start)

    def token_text(self, token: int) -> str:
        """One piece as text: `▁` a space, `<eos>` a line break, a byte piece as SentencePiece names it."""
        return "\n" if token == EOS else self.sp.sp.id_to_piece(token).replace("\u2581", " ")


class SubwordDecoder:
    """Generated text one token at a time: `▁` is a space (none at the start of a line), `<eos>` a line
    break, and byte pieces wait until they make a whole UTF-8 character."""

    def __init__(self, sp: spm.SentencePieceProcessor, line_start: bool = False) -> None:
        self.sp = sp
        self.bytes = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.line_start = line_start

    def flush(self) -> str:
        """Bytes left over that never made a whole character."""
        return self.bytes.decode(b"", final=True)

    def add(self, token: int) -> str:
        if token == EOS:
            self.line_start = True
            return self.flush() + "\n"
        if token in (PAD, BOS):
            return ""
        if self.sp.is_byte(token):
            piece = self.sp.id_to_piece(token)  # <0xAB>
            text = self.bytes.decode(bytes([int(piece[3:5], 16)]))
        else:
            text = self.flush() + self.sp.id_to_piece(token).replace("\u2581", " ")
            if token == UNK:
                text = " \u2047 "  # SentencePiece's own rendering of an unknown piece
        if self.line_start and text:
            text, self.line_start = text.lstrip(" "), False
        return text
