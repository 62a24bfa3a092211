"""What the command-line scripts of experiments/ share: their argparse parser and help formatter, and the
argument types they check values with.

    from paper.cli import ArgumentParser, positive_int
    parser = ArgumentParser(description="...")          # formatter_class=HelpFormatter by default

- ``--help`` shows one default per option: "(default: X)" is added only where the option has a real default
  (not None, not a store_true's False) and its help text does not already say what the default is.
- A usage error prints the one-line message and a hint (``train.py: error: ...`` then ``run with --help for
  usage``), exit status 2, instead of argparse's whole usage block before the message.
"""
from __future__ import annotations

import argparse
import math

HINT = "run with --help for usage"


class HelpFormatter(argparse.HelpFormatter):
    """argparse.ArgumentDefaultsHelpFormatter without its second default: no "(default: None)" after a help
    text that explains the default itself ("default: the run's"), none for flags."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower():  # the help says it (or holds %(default)s, as BooleanOptionalAction's)
            return text
        default = action.default
        if default is None or default is argparse.SUPPRESS:
            return text
        if isinstance(default, bool) and not isinstance(action, argparse.BooleanOptionalAction):
            return text  # store_true / store_false: the flag's presence says it
        if not action.option_strings and action.nargs not in ("?", "*"):
            return text  # a required positional
        return text + " (default: %(default)s)"


class RawDescriptionHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """HelpFormatter that keeps the description's and epilog's line breaks (a docstring with examples)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are one line and a hint, with HelpFormatter as the default."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n{HINT}\n")


# ------------------------------------------------------------------------------------------ argument types

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def given_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations (``args.<dest>``) of the options the command line ``argv`` actually gives, as opposed
    to those left at their defaults: ``argv`` is parsed again with every default replaced by a sentinel."""
    sentinel = object()
    saved = {action.dest: action.default for action in parser._actions}
    try:
        for action in parser._actions:
            action.default = sentinel
        args, _ = parser.parse_known_args(argv)
    finally:
        for action in parser._actions:
            action.default = saved[action.dest]
    return {dest for dest, value in vars(args).items() if value is not sentinel}
