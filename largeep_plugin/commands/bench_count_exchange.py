"""``largeep bench count-exchange``: host time per forward of the count exchange at large EP.

    largeep bench count-exchange --ranks 256,1024            # E = R experts, one slot per rank
    largeep bench count-exchange --ranks 64 --experts 256 --slots 4

One process stands in for the group (the count all-to-all becomes a copy); everything else is the layer's own
exchange (see largeep_plugin/tools/count_exchange_bench.py). Printed: the median host milliseconds of one exchange,
and the same step as the earlier layer did it (the whole [R, P + E + 2] result read and summed in Python).
The aim: under 2 ms at R = E = 1024.
"""
from __future__ import annotations

import argparse
from typing import Any

from largeep_plugin.tools.count_exchange_bench import format_table, time_count_exchange


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be a comma-separated list of integers") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} must list integers >= 1")
    return values


def _positive_int(text: str) -> int:
    values = _positive_ints(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be one integer >= 1")
    return values[0]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("count-exchange", help="host time per forward of the count exchange at large EP",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=_positive_ints, default=[256, 1024],
                   help="EP sizes R, comma-separated (default 256,1024)")
    p.add_argument("--experts", type=_positive_int, default=None, help="experts E (default: E = R)")
    p.add_argument("--slots", type=_positive_int, default=1, help="expert slots per rank L (default 1)")
    p.add_argument("--repeats", type=_positive_int, default=20, help="timed repeats per size (default 20)")
    return p


def run(args: argparse.Namespace) -> int:
    rows = [time_count_exchange(r, args.experts or r, args.slots, args.repeats) for r in args.ranks]
    print(format_table(rows))
    return 0
