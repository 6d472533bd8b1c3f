"""The model card: a README.md written beside the weights by every training run (and by `rnnserve import`),
so that a model folder says what it is wherever it is copied."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path


_ARGV: list[str] | None = None  # the arguments `rnnserve` was called with (cli.main), when not sys.argv


def invoked_with(argv: list[str] | None) -> None:
    global _ARGV
    _ARGV = None if argv is None else list(argv)


def command_line() -> str:
    """The command as typed: `rnnserve` and its arguments, quoted for a shell."""
    return shlex.join(["rnnserve", *(sys.argv[1:] if _ARGV is None else _ARGV)])


def article(cell: str) -> str:
    """"An LSTM", "An RNN", "A GRU"."""
    return "An" if cell in ("lstm", "rnn") else "A"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def write_card(folder: str | Path, *, name: str, task: str, summary: str, languages: dict | None,
               data: list[tuple[str, str]], terms: str, command: str, metrics: dict[str, float | int | str],
               minutes: float | None, architecture: dict, tokenizer: str, usage: str) -> Path:
    """data: (role, description) rows such as ("train", "train.de + train.en, 29,000 pairs")."""
    lines = [f"# {name}", "", summary, "", "| | |", "|---|---|", f"| task | {task} |"]
    if languages:
        lines.append(f"| languages | {languages['source']} → {languages['target']} |")
    lines += [f"| tokenizer | {tokenizer} |",
              f"| architecture | {', '.join(f'{k} {v}' for k, v in architecture.items())} |"]
    if minutes is not None:
        lines.append(f"| training time | {minutes:.1f} minutes |")
    lines += ["", "## Data", "", "| | |", "|---|---|", *(f"| {role} | {what} |" for role, what in data), "",
              f"Terms of the data, as given at training: {terms or 'not stated (pass --data-terms)'}.", "",
              "## Training command", "", "```", command, "```", "", "## Metrics", "", "| metric | value |",
              "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in metrics.items()), "",
              "## Use", "", usage, ""]
    path = Path(folder) / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
