"""Datasets shipped in the repository under data/ (see each folder's SOURCE.md for origin and terms)."""
from __future__ import annotations

from pathlib import Path

from rnnserve.paths import DATA_DIR

SHAKESPEARE = DATA_DIR / "tinyshakespeare" / "input.txt"
# nanoGPT's split of the same file: first 90% (1,003,854 chars) train, last 111,540 validate
SHAKESPEARE_TRAIN_CHARS = 1_003_854


def shakespeare_splits(path: Path = SHAKESPEARE) -> tuple[str, str]:
    text = path.read_text(encoding="utf-8")
    return text[:SHAKESPEARE_TRAIN_CHARS], text[SHAKESPEARE_TRAIN_CHARS:]

MULTI30K = DATA_DIR / "multi30k" / "tok"


def read_multi30k(split: str, src: str = "de", tgt: str = "en") -> tuple[list[list[str]], list[list[str]]]:
    """Line-aligned, lowercased, Moses-tokenized sentences of a split (train, val, test_2016_flickr)."""
    def read(lang: str) -> list[list[str]]:
        return [line.split() for line in (MULTI30K / f"{split}.lc.norm.tok.{lang}").read_text("utf-8").splitlines()]

    return read(src), read(tgt)
