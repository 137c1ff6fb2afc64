"""argparse types that check a flag's value where it is parsed.

    p.add_argument("--vocab-size", type=int_at_least(2), default=64)
    p.add_argument("--compare-ep", type=int_list(2), default="4,8,16")

A bad value is argparse's own error, ``largeep demo: error: argument --vocab-size: must be an integer >= 2,
got '1'``, exit status 2, before any rank starts: never a traceback from inside a rank minutes later.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value
    return parse


def number(low: float = -math.inf, *, above: bool = False) -> Callable[[str], float]:
    """A finite number >= ``low`` (> ``low`` with ``above``)."""
    bound = f"> {low:g}" if above else f">= {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < low or (above and value == low):
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text!r}")
        return value
    return parse


def int_list(low: int) -> Callable[[str], list[int]]:
    """A comma-separated, non-empty list of integers, each >= ``low``."""
    def parse(text: str) -> list[int]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items or not all(_is_int(t) and int(t) >= low for t in items):
            raise argparse.ArgumentTypeError(f"must be a comma-separated list of integers >= {low}, got {text!r}")
        return [int(t) for t in items]
    return parse


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True
