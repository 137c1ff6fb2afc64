"""``LARGEEP_DOCS_QUICK=1``: the shortest run that still exercises a command the docs show.

``tests/test_docs_commands.py`` runs every command of the README, ``docs/`` and the examples' headers exactly as
written, with this variable set. The commands that run long read it here and cap their amount of work (steps,
timed iterations, search restarts); world sizes, configs, files and flags otherwise stay the ones the command
names, so what runs is the documented path, only shorter. Unset or ``0``: no effect.
"""
from __future__ import annotations

import argparse
import os
import sys

QUICK_ENV = "LARGEEP_DOCS_QUICK"


def docs_quick() -> bool:
    """True when ``LARGEEP_DOCS_QUICK=1``; any value other than unset, ``0`` or ``1`` is an error."""
    value = os.environ.get(QUICK_ENV, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{QUICK_ENV}={value!r} must be 0 or 1")
    return value == "1"


def shorten(args: argparse.Namespace, **smallest: int) -> argparse.Namespace:
    """Under ``LARGEEP_DOCS_QUICK=1`` cap each named integer flag of ``args`` at the value given (in place), and
    say which were cut, once per job (rank 0, or a process outside a launcher). Returns ``args``."""
    if not docs_quick():
        return args
    cut = []
    for name, small in smallest.items():
        value = getattr(args, name)
        if value > small:
            setattr(args, name, small)
            cut.append(f"--{name.replace('_', '-')} {value} -> {small}")
    if cut and os.environ.get("RANK", "0") == "0":
        print(f"{QUICK_ENV}=1: " + ", ".join(cut), file=sys.stderr, flush=True)
    return args
