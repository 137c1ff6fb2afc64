"""``largeep bench``: benchmarks, each a sub-subcommand in its own module ``commands/bench_<name>.py``.

    largeep bench overlap          # flat vs hierarchical, overlap off vs 2/4/8 chunks, on the emulated cluster
    largeep bench layer            # one MoE layer: stock DeepSpeed MoE vs large-EP vs ideal, on CPU ranks
    largeep bench count-exchange   # host time per forward of the count exchange at EP 256 and 1024
    largeep bench hf               # a Hugging Face MoE model: unconverted, AutoEP, large-EP, large-EP + replicas
    largeep bench balance          # skewed router: one expert per rank vs dynamic replicas, step by step

A benchmark module exposes ``add_parser(subparsers) -> ArgumentParser`` and ``run(args) -> int``, like a
subcommand; add its name to ``_BENCHES`` (one line) to register it.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from largeep_plugin.commands import register_subcommands

# Benchmark modules (commands/bench_<name>.py), in the order ``--help`` lists them.
_BENCHES = (
    "overlap",
    "layer",
    "count_exchange",
    "hf",
    "balance",
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmarks (largeep bench --help lists them)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench_name", metavar="BENCH")
    register_subcommands(sub, [f"largeep_plugin.commands.bench_{name}" for name in _BENCHES], "_bench_run")
    return p


def run(args: argparse.Namespace) -> int:
    bench_run = getattr(args, "_bench_run", None)
    if bench_run is None:
        print(f"usage: largeep bench {{{','.join(_BENCHES)}}} ... (see largeep bench --help)", file=sys.stderr)
        return 2
    return int(bench_run(args) or 0)
