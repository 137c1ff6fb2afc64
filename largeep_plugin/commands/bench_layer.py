"""``largeep bench layer``: one MoE layer, forward + backward, stock DeepSpeed MoE against large-EP on CPU ranks.

    largeep bench layer                                    # EP 4, 8, 16; 2048 tokens per rank; H=256, F=512
    largeep bench layer --ep 16 --skew 0.5 --iters 10      # one EP size, skewed routing, more iterations
    largeep bench layer --variants large_ep,ideal          # without DeepSpeed
    largeep bench layer --ep 4 --variants large_ep,colocated8,colocated8_gemm   # 8 fine-grained experts per rank

Variants (see largeep_plugin/tools/layer_bench.py): stock_dropless, stock_cf1 (DeepSpeed's MoE without / with capacity
factor 1.0), large_ep, and ideal (the expert MLP alone on perfectly balanced rows). E = EP size experts, one per
rank, the same weights and tokens everywhere. Each (EP, variant) runs in a fresh world of EP gloo ranks with one
thread each; on a machine with fewer cores than ranks the ranks share the cores, which inflates compute relative
to communication. Printed: tokens/s per rank, each variant relative to large-EP, peak memory growth per rank,
the routing's imbalance and the stock layer's padding; written: JSON and a PNG chart.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from largeep_plugin.tools.docs_quick import shorten
from largeep_plugin.tools.layer_bench import (ALL_VARIANTS, VARIANTS, LayerBenchSettings, format_table, result_json,
                                              run_layer_bench)
from largeep_plugin.tools.side_by_side import write_json_and_chart
from .flags import int_at_least, int_list, number


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("layer", help="one MoE layer: stock DeepSpeed MoE vs large-EP vs ideal, on CPU ranks",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_bench_flags(p, tokens=2048, hidden=256, ffn=512, iters=5)
    p.add_argument("--output", default="runs/bench_layer", help="directory for the JSON and PNG (default runs/bench_layer)")
    return p


def add_layer_bench_flags(p: argparse.ArgumentParser, *, tokens: int, hidden: int, ffn: int, iters: int) -> None:
    """The benchmark's flags (shared with ``largeep demo``, which uses smaller defaults)."""
    pos = int_at_least(1)
    p.add_argument("--ep", type=int_list(2), default="4,8,16",
                   help="EP sizes = ranks = experts, comma-separated (default 4,8,16)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(ALL_VARIANTS)} (default: {','.join(VARIANTS)}); "
                        "colocated8 / colocated8_gemm: 8 experts per rank, the same rows split 8 ways, as a loop / as grouped GEMMs")
    p.add_argument("--tokens", type=pos, default=tokens, help=f"tokens per rank (default {tokens})")
    p.add_argument("--hidden-size", type=pos, default=hidden, help=f"H (default {hidden})")
    p.add_argument("--ffn-hidden-size", type=pos, default=ffn, help=f"expert FFN width (default {ffn})")
    p.add_argument("--top-k", type=int, choices=(1, 2), default=2, help="experts per token, 1 or 2 (default 2)")
    p.add_argument("--skew", type=number(0.0), default=0.0,
                   help="routing skew: 0 = a fresh router's near-uniform routing; s > 0 adds -s*ln(e+1) to expert "
                        "e's logit (default 0)")
    p.add_argument("--iters", type=pos, default=iters, help=f"timed iterations per variant (default {iters})")
    p.add_argument("--warmup", type=int_at_least(0), default=2, help="untimed iterations per variant (default 2)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="seed of weights and tokens (default 0)")


def parse_list(flag: str, text: str, kind: type) -> list[Any]:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}={text!r} must be a comma-separated list of {kind.__name__}") from None
    if not values:
        raise ValueError(f"{flag}={text!r} is empty")
    return values


def settings_from_args(args: argparse.Namespace) -> tuple[LayerBenchSettings, list[int], list[str]]:
    settings = LayerBenchSettings(
        hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size, tokens_per_rank=args.tokens,
        top_k=args.top_k, skew=args.skew, warmup=args.warmup, iters=args.iters, seed=args.seed,
    )
    variants = parse_list("--variants", args.variants, str)
    unknown = [v for v in variants if v not in ALL_VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; valid are {list(ALL_VARIANTS)}")
    return settings, args.ep, variants


def stock_builder(variants: list[str]) -> Any:
    """DeepSpeed's side, imported only when a stock variant is asked for (the core never imports DeepSpeed)."""
    if not any(v.startswith("stock") for v in variants):
        return None
    try:  # the adapter imports DeepSpeed; doing it here, before the ranks fork, imports it once
        from largeep_plugin.integrations.deepspeed.engine import load_deepspeed_ops_before_fork
        from largeep_plugin.integrations.deepspeed.stock import bench_stock_layer
    except ImportError as e:
        raise ValueError(f"the stock variants need DeepSpeed ({e}; pip install -e .[deepspeed]); "
                         "or leave the stock rows out (bench layer --variants large_ep,ideal; demo --no-compare)") from e

    load_deepspeed_ops_before_fork()
    return bench_stock_layer


def write_outputs(directory: str, settings: LayerBenchSettings, rows: list[dict[str, Any]], title: str,
                  stem: str = "layer_bench") -> list[str]:
    """``<stem>.json`` and ``<stem>.png`` in ``directory``; returns their paths."""
    order = sorted(rows, key=lambda r: (r["ep"], ALL_VARIANTS.index(r["variant"])))
    return write_json_and_chart(directory, stem, result_json(settings, rows), order, title,
                                group_of=lambda r: f"EP {r['ep']}")


def run(args: argparse.Namespace) -> int:
    try:
        shorten(args, iters=1, warmup=1, tokens=128, hidden_size=64, ffn_hidden_size=128)
        settings, eps, variants = settings_from_args(args)
        build = stock_builder(variants)
    except ValueError as e:
        print(f"largeep bench layer: {e}", file=sys.stderr)
        return 2
    print(f"bench layer: T={settings.tokens_per_rank} tokens/rank, H={settings.hidden_size}, "
          f"F={settings.ffn_hidden_size}, top-{settings.top_k}, skew {settings.skew}, EP {eps}", file=sys.stderr)
    rows = run_layer_bench(settings, eps, variants, build,
                           on_row=lambda r: print(f"  EP {r['ep']:>2} {r['variant']:<15} "
                                                  f"{r['tokens_per_s_per_rank']:>10,.0f} tokens/s/rank", file=sys.stderr))
    print(format_table(rows))
    for path in write_outputs(args.output, settings, rows, "MoE layer fwd+bwd, CPU gloo ranks"):
        print(f"written {path}")
    return 0
