"""``largeep bench balance``: a skewed router, one expert per rank against dynamic replicas, step by step.

    largeep bench balance                              # EP 8 and 16, S = 1, skew 0.15, 6 steps
    largeep bench balance --ep 16 --spare-slots 2      # two spare slots per rank
    largeep bench balance --skew 0                     # a fresh router's near-uniform load (nothing to fix)

Two layers with the same weights train side by side on the same tokens (largeep_plugin/tools/balance_bench.py):
``static`` (one expert per rank) and ``dynamic`` (``dynamic_replicas=S``, re-planned after every step from the
load). Printed per step: the expert imbalance, the rank imbalance (max / mean rows) of both, and the busiest rank's
expert time (forward + backward of its slots on the rows they received), with the ranks timed in turn so that no
two share a core: what a cluster with one GPU per rank would wait for. Also the force-balanced ideal and whether
the targets (EP 16, S = 1, expert imbalance >= 2.5: rank imbalance <= 1.10, busiest rank >= 1.4x faster) were met.
Written: JSON and a PNG of both per step.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from largeep_plugin.tools.docs_quick import shorten
from .flags import int_at_least, int_list, number


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("balance", help="skewed router: one expert per rank vs dynamic replicas, per step",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pos = int_at_least(1)
    p.add_argument("--ep", type=int_list(2), default="8,16", help="EP sizes = ranks = experts (default 8,16)")
    p.add_argument("--spare-slots", type=pos, default=1, help="S, spare expert slots per rank (default 1)")
    p.add_argument("--tokens", type=pos, default=1024, help="tokens per rank (default 1024)")
    p.add_argument("--hidden-size", type=pos, default=256, help="H (default 256)")
    p.add_argument("--ffn-hidden-size", type=pos, default=512, help="expert FFN width (default 512)")
    p.add_argument("--top-k", type=pos, default=2, help="experts per token (default 2)")
    p.add_argument("--skew", type=number(0.0), default=0.15,
                   help="routing skew: expert e's logit moves by -skew*ln(e+1) (default 0.15: expert imbalance "
                        "about 3 at EP 16, 1.9 at EP 8; 0: a fresh router)")
    p.add_argument("--steps", type=pos, default=6, help="training steps (default 6; the plan exists from step 1)")
    p.add_argument("--repeats", type=pos, default=5, help="timings per rank and step, the best counts (default 5)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="seed of weights and tokens (default 0)")
    p.add_argument("--output", default="runs/bench_balance", help="directory for the JSON and PNG")
    return p


def run(args: argparse.Namespace) -> int:
    from largeep_plugin.tools.balance_bench import (BalanceBenchSettings, format_report, plot, result_json,
                                                    run_balance_bench)
    from largeep_plugin.tools.side_by_side import write_json

    shorten(args, steps=3, repeats=1, tokens=128, hidden_size=64, ffn_hidden_size=128)
    try:
        settings = BalanceBenchSettings(hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
                                        tokens_per_rank=args.tokens, top_k=args.top_k, skew=args.skew,
                                        steps=args.steps, spare_slots=args.spare_slots, repeats=args.repeats,
                                        seed=args.seed)
        if any(args.top_k > ep for ep in args.ep):
            raise ValueError(f"--top-k {args.top_k} is larger than an EP size of {args.ep} (experts = EP size)")
    except ValueError as e:
        print(f"largeep bench balance: {e}", file=sys.stderr)
        return 2
    results = run_balance_bench(settings, args.ep)
    print(format_report(settings, results))
    os.makedirs(args.output, exist_ok=True)
    paths = [write_json(os.path.join(args.output, "balance_bench.json"), result_json(settings, results))]
    plot(results, os.path.join(args.output, "balance_bench.png"))
    paths.append(os.path.join(args.output, "balance_bench.png"))
    for path in paths:
        print(f"written {path}")
    return 0
