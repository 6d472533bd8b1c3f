"""Reading a user's training data, checked before any training starts.

Plain-text files are UTF-8, one sentence (or, for a language model, one line of text) per line;
`.gz` files are read the same way. Parallel data comes as two line-aligned files or one
tab-separated file. Every problem stops with a `DataError` naming the file and the line: files of
different lengths, bytes that are not UTF-8, a missing column, nothing left to train on.

Pairs with a side longer than `max_chars` characters (or an empty side) are dropped and counted,
not fatal: a corpus scraped from the web always holds a few.
"""
from __future__ import annotations

import gzip
import logging
import random
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAX_CHARS = 400  # default bound on a training sentence's length (characters, each side)


class DataError(ValueError):
    """Bad training data: the message names the file and, where there is one, the line."""


def read_lines(path: str | Path) -> list[str]:
    """The file's lines without their line endings; DataError for a missing file or a non-UTF-8 line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    lines = []
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    lines.append(raw.decode("utf-8").rstrip("\r\n"))
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{number}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError) as e:  # a truncated or corrupt .gz
        raise DataError(f"{path}: cannot be read: {e}") from None
    if lines and lines[0].startswith("\ufeff"):
        lines[0] = lines[0][1:]  # a byte-order mark is not text
    return lines


@dataclass
class Parallel:
    src: list[str]
    tgt: list[str]
    dropped: int = 0  # pairs left out: empty or longer than the bound
    origin: str = ""

    def __len__(self) -> int:
        return len(self.src)


def read_parallel(src_path: str | Path, tgt_path: str | Path, max_chars: int = MAX_CHARS) -> Parallel:
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        shorter, n = (src_path, len(src)) if len(src) < len(tgt) else (tgt_path, len(tgt))
        longer = tgt_path if shorter == src_path else src_path
        raise DataError(f"{longer}:{n + 1}: line-aligned files differ in length: {src_path} has {len(src)} lines, "
                        f"{tgt_path} has {len(tgt)}")
    return _filtered(src, tgt, max_chars, f"{src_path} + {tgt_path}")


def read_tsv(path: str | Path, src_column: int = 0, tgt_column: int = 1, max_chars: int = MAX_CHARS) -> Parallel:
    """Source and target from two columns (0-based) of a tab-separated file."""
    src, tgt, blank = [], [], 0
    for number, line in enumerate(read_lines(path), 1):
        if not line.strip():
            blank += 1
            continue
        cells = line.split("\t")
        for column in (src_column, tgt_column):
            if column >= len(cells):
                raise DataError(f"{path}:{number}: no column {column} (the line has {len(cells)} columns, "
                                f"numbered from 0)")
        src.append(cells[src_column])
        tgt.append(cells[tgt_column])
    return _filtered(src, tgt, max_chars, str(path), blank)


def _filtered(src: list[str], tgt: list[str], max_chars: int, origin: str, blank: int = 0) -> Parallel:
    """The pairs with both sides present and within max_chars; `blank`: lines already skipped as blank (a TSV's)."""
    keep = [i for i, (s, t) in enumerate(zip(src, tgt))
            if s.strip() and t.strip() and len(s) <= max_chars and len(t) <= max_chars]
    out = Parallel([src[i].strip() for i in keep], [tgt[i].strip() for i in keep], len(src) - len(keep), origin)
    if not out.src:
        lines = len(src) + blank
        if lines == 0:
            raise DataError(f"{origin}: no sentence pairs to train on: no lines at all")
        why = [f"{blank} blank" if blank else "",
               f"{out.dropped} with an empty side or a side longer than {max_chars} characters" if out.dropped else ""]
        raise DataError(f"{origin}: no sentence pairs to train on: of its {lines} lines, "
                        f"{' and '.join(w for w in why if w)}")
    return out


def hold_out(data: Parallel, share: float, seed: int, max_lines: int = 1000) -> tuple[Parallel, Parallel]:
    """A fixed, seeded share of the pairs (at most `max_lines`, at least one) for validation; the rest trains."""
    n = min(max_lines, max(1, round(len(data) * share)))
    if len(data) - n < 1:
        raise DataError(f"{data.origin}: {len(data)} sentence pairs are too few to hold out a validation set")
    picked = set(random.Random(seed).sample(range(len(data)), n))
    train = [i for i in range(len(data)) if i not in picked]
    valid = sorted(picked)
    return (Parallel([data.src[i] for i in train], [data.tgt[i] for i in train], data.dropped, data.origin),
            Parallel([data.src[i] for i in valid], [data.tgt[i] for i in valid], 0, data.origin + " (held out)"))


def read_text(path: str | Path) -> str:
    """A language model's training text: the whole file, checked for UTF-8 line by line."""
    lines = read_lines(path)
    text = "\n".join(lines) + ("\n" if lines else "")
    if not text.strip():
        raise DataError(f"{path}: no text to train on")
    return text
