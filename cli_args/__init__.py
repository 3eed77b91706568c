"""What every command line of this project shares: gpt-generate, gpt-train, gpt-eval, gpt-serve
and gpt-chat parse their arguments with `Parser` and check numbers with the validators here, so
a mistake reads the same in each.

A package of its own, beside gpt, server, training and client, with nothing but the standard
library: importing anything under gpt imports torch, and gpt-chat must start without it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, `PROG: error: MESSAGE`, with exit status 2
    (argparse's own prints the whole usage too, which buries the message)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(s: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def float_in(lo: float, hi: float, lo_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a number in [lo, hi], or in (lo, hi] with lo_open."""

    def check(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
        if not (lo < v if lo_open else lo <= v) or v > hi:
            raise argparse.ArgumentTypeError(f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {s}")
        return v

    return check


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """A stop string as typed: \\n, \\t, \\r and \\\\ become a newline, a tab, a carriage return and
    a backslash (what the web page's stop field does too); any other backslash stays as it is.
    Prompts are taken literally."""
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPES:
            out.append(_ESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)
