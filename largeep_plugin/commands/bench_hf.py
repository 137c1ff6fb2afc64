"""``largeep bench hf``: a Hugging Face MoE model trained side by side, unconverted, with DeepSpeed's AutoEP, with
large-EP, and with large-EP plus replicas of the hot experts, on CPU ranks.

    largeep bench hf --family mixtral --ep 4                  # both routers, every variant, E = 4 experts
    largeep bench hf --family deepseek_v3 --ep 4,8 --router skewed --iters 9
    largeep bench hf --family gpt_oss --ep 4 --variants unconverted,large_ep

The model: a tiny random-init model of the family (no download; --hidden-size, --ffn-hidden-size, --num-layers...),
E = EP experts, the same weights and tokens (--batch-size x --seq-len per rank) for every variant, all under one
DeepSpeed config (ZeRO stage 1, AdamW). One step = forward + backward + optimizer step.
    unconverted         plain deepspeed.initialize: every rank holds every expert (data parallel)
    autoep              DeepSpeed's AutoEP ("expert_parallel" section, autoep_size = EP); skipped, with the reason
                        in one line, where it cannot run (transformers > 5.22.2, or no AutoEP preset: olmoe, gpt_oss)
    large_ep            the plugin's conversion, expert e on rank e
    large_ep_replicas   large-EP with E + X expert slots (--replica-slots X, default one more per rank): the extra
                        copies go to the hot experts, planned by plan_placement from the load large_ep recorded
                        over its first steps (--record-steps)
Routers: uniform (no expert favoured) and skewed (the last quarter of the experts favoured by --skew standard
deviations; printed: the measured max / mean tokens per expert).

Timing: the variants interleaved in one world per (EP, router), --warmup untimed steps, the median of --iters
timed ones. The ranks share this machine's cores, so these are CPU numbers, not GPU predictions. Printed: tokens/s
per rank, each variant over autoep and over unconverted, the peak memory per rank (its model, gradients, optimizer
state and first step), the expert imbalance and the planned max / mean rank load; written to --out: hf_bench.json
and hf_bench.png. See largeep_plugin/integrations/hf/bench.py.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from largeep_plugin.tools.docs_quick import shorten
from largeep_plugin.tools.side_by_side import write_json_and_chart
from .bench_layer import parse_list
from .flags import add_model_flags, int_at_least, int_list, number

ROUTER_CHOICES = ("uniform", "skewed", "both")


def _families() -> str:
    try:
        from largeep_plugin.integrations.hf.tiny_models import BENCH_FAMILIES
    except ImportError:  # transformers (hf extra) missing: the command says so when run
        return "see largeep_plugin/integrations/hf/tiny_models.py"
    return ", ".join(BENCH_FAMILIES)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("hf", help="a Hugging Face MoE model: unconverted, AutoEP, large-EP, large-EP + replicas",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pos, nonneg = int_at_least(1), int_at_least(0)
    p.add_argument("--family", default="mixtral", help=f"the model family: {_families()} (default mixtral)")
    p.add_argument("--ep", type=int_list(2), default="4", help="EP sizes = ranks = experts, comma-separated (default 4)")
    p.add_argument("--router", choices=ROUTER_CHOICES, default="both", help="routing to run (default both)")
    p.add_argument("--variants", default="unconverted,autoep,large_ep,large_ep_replicas",
                   help="comma-separated subset (default: all four)")
    add_model_flags(p, batch_size=8, seq_len=32, hidden_size=128, ffn_hidden_size=256, num_layers=2, num_heads=4,
                    top_k=2)
    p.add_argument("--vocab-size", type=pos, default=256, help="vocabulary (default 256)")
    p.add_argument("--skew", type=number(0.0), default=1.5,
                   help="skewed router: hot experts' logits raised by this many standard deviations (default 1.5)")
    p.add_argument("--replica-slots", type=pos, default=None,
                   help="extra expert slots of large_ep_replicas (default: one per rank)")
    p.add_argument("--record-steps", type=pos, default=2, help="first steps of every variant, before the timed ones; the replicas are planned from large_ep's load over them (default 2)")
    p.add_argument("--warmup", type=nonneg, default=2, help="untimed steps per variant (default 2)")
    p.add_argument("--iters", type=pos, default=5, help="timed steps per variant (default 5)")
    p.add_argument("--seed", type=nonneg, default=0, help="seed of the weights and the tokens (default 0)")
    p.add_argument("--lr", type=number(0.0, above=True), default=1e-5, help="AdamW learning rate (default 1e-5)")
    p.add_argument("--timeout", type=number(0.0, above=True), default=1800.0,
                   help="seconds one world may take (default 1800)")
    p.add_argument("--out", default="runs/bench_hf", help="directory for the JSON and PNG (default runs/bench_hf)")
    return p


def run(args: argparse.Namespace) -> int:
    try:
        shorten(args, iters=1, warmup=1, record_steps=1, seq_len=16)
        from largeep_plugin.integrations.hf.bench import (HFBenchSettings, autoep_unavailable, check_variants,
                                                          format_table, result_json, run_hf_bench)
        from largeep_plugin.integrations.hf.tiny_models import ModelSizes

        sizes = ModelSizes(hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
                           num_layers=args.num_layers, num_heads=args.num_heads, vocab_size=args.vocab_size,
                           seq_len=args.seq_len, batch_size=args.batch_size, top_k=args.top_k)
        settings = HFBenchSettings(family=args.family, sizes=sizes, skew=args.skew, replica_slots=args.replica_slots,
                                   record_steps=args.record_steps, warmup=args.warmup, iters=args.iters,
                                   seed=args.seed, lr=args.lr)
        variants = parse_list("--variants", args.variants, str)
        check_variants(variants)
        too_small = [ep for ep in args.ep if ep < args.top_k]
        if too_small:
            raise ValueError(f"--ep {too_small} < --top-k {args.top_k}: E = EP experts must hold top-k of them")
        skipped = autoep_unavailable(args.family) if "autoep" in variants else None
    except ImportError as e:
        print(f"largeep bench hf: needs transformers and deepspeed ({e}; pip install -e .[hf,deepspeed])",
              file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"largeep bench hf: {e}", file=sys.stderr)
        return 2
    routers = ["uniform", "skewed"] if args.router == "both" else [args.router]
    print(f"bench hf: {args.family}, EP {args.ep}, routers {routers}; H={sizes.hidden_size}, expert F="
          f"{sizes.ffn_hidden_size}, {sizes.num_layers} layers, top-{sizes.top_k}, {sizes.tokens_per_rank} tokens/rank; "
          f"E = EP experts; ZeRO 1, AdamW; large_ep_replicas: E + "
          f"{'EP' if args.replica_slots is None else args.replica_slots} expert slots", file=sys.stderr)
    if skipped is not None:
        print(f"  autoep skipped: {skipped}", file=sys.stderr)
        variants = [v for v in variants if v != "autoep"]

    def on_world(w: dict[str, Any]) -> None:
        if w["imbalance"] is not None:
            layers = ", ".join(f"{x:.2f}" for x in w["layer_imbalance"])
            print(f"  EP {w['ep']} {w['router']}: tokens per expert max/mean {w['imbalance']:.2f} (last step per "
                  f"layer: {layers}); large_ep_replicas copies per expert {w['copies']}", file=sys.stderr)

    rows, worlds = run_hf_bench(settings, args.ep, routers, variants, timeout=args.timeout, on_world=on_world)
    print(format_table(rows))
    paths = write_json_and_chart(args.out, "hf_bench", result_json(settings, rows, worlds, skipped), rows,
                                 f"{args.family} training step, CPU gloo ranks",
                                 group_of=lambda r: f"EP {r['ep']} {r['router']}")
    for path in paths:
        print(f"written {path}")
    return 0
