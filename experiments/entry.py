"""The experiments' command-line entry: lrjax's contract on top of absl and ml_collections.

``python -m experiments.X --help`` prints every flag and exits 0; a flag that does not parse (a
misspelt ``--config.FIELD``, a bad ``:variant`` suffix, a value of the wrong type, a missing
``--workdir``, an unknown flag) is one ``error:`` line on stderr and exit status 2, never a
traceback; then ``main`` runs under ``absl.app``.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable

from absl import app, flags

__all__ = ["run", "parse_flags", "check_flags", "define_config_file"]

_HELP = ("--help", "-h", "--helpshort", "--helpfull", "-?")


def _one_line(error: BaseException) -> str:
    """One line from an absl / ml_collections parse error (whose text may hold a repr or a
    whole traceback of the config file)."""
    text = error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) \
        else str(error)
    for _ in range(2):  # a KeyError inside an AttributeError: a repr of a repr
        if text[:1] in "'\"" and text[-1:] == text[:1]:
            try:
                text = str(ast.literal_eval(text))
            except (ValueError, SyntaxError):
                break
    if "Traceback (most recent call last)" in text:  # keep the flag and the final error
        head, *_, last = [line.strip() for line in text.splitlines() if line.strip()]
        text = f"{head.split(' Traceback')[0]} {last}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) \
        or type(error).__name__


def define_config_file(name: str, default: str, help_string: str):
    """``ml_collections.config_flags.DEFINE_config_file``, whose ``--config.FIELD=...``
    overrides are read from the command line as the flag is defined: a misspelt field is one
    ``error:`` line and exit 2 there."""
    from ml_collections import config_flags

    try:
        return config_flags.DEFINE_config_file(name, default, help_string)
    except Exception as e:  # noqa: BLE001 - a bad override on the command line
        what = f"--{name} has no field " if isinstance(e, AttributeError) else ""
        print(f"error: {what}{_one_line(e)}", file=sys.stderr)
        sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """Parse ``argv`` with absl's flags (what ``app.run`` does; its ``flags_parser`` here):
    exit 0 after ``--help``, exit 2 with one ``error:`` line for anything that does not parse.
    Returns the arguments left over."""
    if any(a in _HELP for a in argv[1:]):
        print(flags.FLAGS.main_module_help() or flags.FLAGS.get_help())
        sys.exit(0)
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - absl and ml_collections raise many types
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)


def check_flags(argv: list[str]) -> None:
    """:func:`parse_flags`, then the flags back to unparsed (for tests)."""
    try:
        parse_flags(argv)
    finally:
        flags.FLAGS.unparse_flags()


def run(main: Callable[[list[str]], None], argv: list[str] | None = None) -> None:
    """``app.run(main)`` with :func:`parse_flags` as its flag parser."""
    app.run(main, argv=argv, flags_parser=parse_flags)
