"""Argument parsing shared by every `minidalle` subcommand (and `minidalle serve`): one-line errors, range types,
flags derived from `minidalle.params`. Torch-free, so `--help` and a usage error cost no heavy import.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from minidalle.errors import InvalidInput
from minidalle.params import Param

PROG = "minidalle"
EXIT_USAGE = 2  # argparse's own exit status for bad arguments; validation errors use the same
EXIT_INTERRUPTED = 130  # the shell convention for Ctrl-C


def error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage text is one `--help` away)."""

    def error(self, message: str):
        error(f"{' '.join(message.split())} (see `{self.prog} --help`)")
        raise SystemExit(EXIT_USAGE)


def one_line(e: BaseException, flags: dict[str, str] | None = None) -> str:
    """An error as one line; an InvalidInput's field shown as the flag the user typed (`flags`: field -> flag)."""
    if isinstance(e, InvalidInput):
        field = (flags or {}).get(e.field, e.field)
        text = f"{field}: {e.message}"
    elif isinstance(e, OSError) and e.filename is not None and not str(e).startswith(str(e.filename)):
        text = f"{e.strerror or e}: {e.filename}"
    else:
        text = str(e)
    return " ".join(text.split()) or type(e).__name__


def run_main(func: Callable[[list[str] | None], int | None], argv: list[str] | None = None,
             flags: dict[str, str] | None = None) -> int:
    """Run a subcommand's main: bad input (ValueError, InvalidInput) and OS errors (missing files, unknown hub ids)
    are one line on stderr and exit status 2, Ctrl-C is 130; never a traceback."""
    try:
        return int(func(argv) or 0)
    except (ValueError, OSError) as e:
        error(one_line(e, flags))
        return EXIT_USAGE
    except KeyboardInterrupt:
        error("interrupted")
        return EXIT_INTERRUPTED


def int_in(lo: int | None, hi: int | None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is not in [{lo}, {hi}]")
        return v
    return parse


def float_in(lo: float, hi: float, *, open_low: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (lo < v <= hi if open_low else lo <= v <= hi):
            raise argparse.ArgumentTypeError(f"{v:g} is not in {'(' if open_low else '['}{lo:g}, {hi:g}]")
        return v
    return parse


def param_type(p: Param) -> Callable[[str], Any]:
    """An argparse `type` that parses a flag's text and checks it against the parameter's bounds."""
    def parse(text: str) -> Any:
        try:
            value = p.type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if p.type is int else 'a number'}") \
                from None
        try:
            p.check(value)
        except InvalidInput as e:
            raise argparse.ArgumentTypeError(e.message) from None
        return value
    return parse


def add_param(ap: argparse.ArgumentParser, p: Param, *, default: Any = None, help_default: bool = True) -> None:
    """The flag of parameter `p`. `default` None means "not given" (the library's default then applies)."""
    assert p.cli_flag, p.name
    text = p.help + (f" (default {p.default})" if help_default and p.default not in (None, (), "") else "")
    text = text.replace("%", "%%")
    if p.type is bool:
        if p.default:  # on by default: the flag turns it off
            flag = "--no-" + p.cli_flag.removeprefix("--")
            ap.add_argument(flag, dest=p.name, action="store_false", default=default, help=text)
        else:
            ap.add_argument(p.cli_flag, dest=p.name, action="store_true", default=default, help=text)
    elif p.max_items is not None:
        ap.add_argument(p.cli_flag, dest=p.name, action="append", default=default, metavar=p.name.upper()[:-1],
                        help=text + f"; repeatable, at most {p.max_items}")
    elif p.choices is not None:  # checked by the Param, so the message is the library's ("unknown scheduler …")
        long = len(p.choices) > 4  # a long list reads better in the help text than in the usage line
        ap.add_argument(p.cli_flag, dest=p.name, type=param_type(p), default=default,
                        metavar="NAME" if long else "{" + ",".join(p.choices) + "}",
                        help=text + (f"; {p.bounds()}" if long else ""))
    else:
        ap.add_argument(p.cli_flag, dest=p.name, type=param_type(p), default=default,
                        metavar="N" if p.type is int else "X", help=text)


def flags_of(params: dict[str, Param]) -> dict[str, str]:
    """field -> the flag that sets it, for error messages."""
    return {name: p.cli_flag for name, p in params.items() if p.cli_flag}
