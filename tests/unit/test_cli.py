"""The `rnnserve` command line: every option of every subcommand says what it does."""
import argparse

from rnnserve.cli import build_parser


def subparsers(parser: argparse.ArgumentParser, path: str = "rnnserve"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from subparsers(sub, f"{path} {name}")


def test_every_option_of_every_subcommand_has_a_help_text():
    seen, missing = 0, []
    for path, parser in subparsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            seen += 1
            if not (action.help or "").strip():
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert seen > 60 and missing == []


def test_training_flags_show_their_defaults():
    train_lm = dict(subparsers(build_parser()))["rnnserve train lm"]
    text = train_lm.format_help()
    assert "--hidden-size HIDDEN_SIZE" in text and "hidden units per layer (default: 512)" in text
