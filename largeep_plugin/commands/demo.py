"""``largeep demo``: train a small MoE transformer with one expert per rank on a local world of CPU ranks.

    largeep demo                                   # 16 gloo ranks, 4 MoE layers x 16 experts, top-2
    largeep demo --world-size 4 --steps 30         # a quick look
    largeep demo --record-load runs/load           # also write the routing load for `largeep plan`

The command spawns the ranks itself (one process each, one thread each). At the end it prints the loss (first vs
last), the training throughput and the per-expert load of each MoE layer, and writes ``summary.json`` to the
output directory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..launch import run_world
from ..models.tiny_moe import TinyMoEConfig
from ..models.training import TrainSettings, train_rank, warm_up_before_fork


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="train a small MoE transformer with one expert per rank on local CPU ranks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--world-size", type=int, default=16, help="ranks to spawn = experts per layer (default 16)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per rank per step (default 8)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--hidden-size", type=int, default=64, help="model width H (default 64)")
    p.add_argument("--ffn-hidden-size", type=int, default=128, help="expert MLP width (default 128)")
    p.add_argument("--num-layers", type=int, default=4, help="transformer layers, one MoE block each (default 4)")
    p.add_argument("--num-heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--vocab-size", type=int, default=64, help="vocabulary of the synthetic data (default 64)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    p.add_argument("--bias-update-rate", type=float, default=1e-3, help="balancing-bias step (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and the data (default 0)")
    p.add_argument("--output-dir", default="runs/demo", help="where summary.json goes (default runs/demo)")
    p.add_argument("--record-load", metavar="DIR", default=None,
                   help="write the routing load and co-activation JSON files for `largeep plan` to DIR")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before the world is killed (default 900)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    """Validate the flags (ValueError naming the flag) and build the run's settings."""
    if args.world_size < 1:
        raise ValueError(f"--world-size={args.world_size} must be >= 1")
    model = TinyMoEConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        seq_len=args.seq_len,
        num_experts=args.world_size,  # one expert per rank
        top_k=args.top_k,
        seed=args.seed,
    )
    return TrainSettings(
        model=model, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        bias_update_rate=args.bias_update_rate, seed=args.seed, record_load=args.record_load,
        progress=not args.no_progress,
    )


def load_table(load_per_layer: list[list[int]]) -> str:
    """Per-expert share of the assignments of each layer, in percent (100 / E each when balanced)."""
    num_experts = len(load_per_layer[0])
    head = "layer " + "".join(f"{'e' + str(e):>6}" for e in range(num_experts)) + "  max/mean"
    lines = [head]
    for i, counts in enumerate(load_per_layer):
        total = sum(counts) or 1
        shares = "".join(f"{100.0 * c / total:6.1f}" for c in counts)
        lines.append(f"{i:>5} {shares}  {max(counts) * num_experts / total:8.2f}")
    return "\n".join(lines)


def report(summary: dict, settings: TrainSettings) -> str:
    losses = summary["losses"]
    k = max(1, min(5, len(losses) // 4))  # average a few steps: one step's loss is noisy
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    lines = [
        f"loss: first {first:.3f} -> last {last:.3f} (mean of the first and last {k} step(s); uniform guess "
        f"{summary['uniform_loss']:.3f}, best possible {summary['entropy_floor']:.3f})",
        f"throughput: {summary['tokens_per_s']:,.0f} tokens/s over {summary['timed_steps']} steps "
        f"({summary['tokens_per_step']:,} tokens per step, forward + backward + optimizer)"
        if summary["tokens_per_s"] else "throughput: too few steps to time",
        f"imbalance max/mean, step 1 -> last step, per layer: "
        + ", ".join(f"{a:.2f}->{b:.2f}" for a, b in zip(summary["first_step_imbalance"], summary["last_step_imbalance"])),
        "tokens per expert over the run (% of the layer's assignments):",
        load_table(summary["load_per_layer"]),
    ]
    if summary["record_load_files"]:
        lines.append(f"routing load written to {settings.record_load} ({len(summary['record_load_files'])} files)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValueError as e:
        print(f"largeep demo: {e}", file=sys.stderr)
        return 2
    m = settings.model
    print(
        f"largeep demo: {args.world_size} ranks, {m.num_layers} MoE layers x {m.num_experts} experts (top-{m.top_k}), "
        f"H={m.hidden_size}, F={m.ffn_hidden_size}, {settings.batch_size}x{m.seq_len} tokens per rank, "
        f"{settings.steps} steps",
        file=sys.stderr,
    )
    warm_up_before_fork(settings.model)
    summary = run_world(train_rank, args.world_size, args=(settings,), timeout=args.timeout)[0]
    print(report(summary, settings))
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "summary.json")
    with open(path, "w", encoding="utf-8") as f:
        flags = {k: v for k, v in vars(args).items() if not k.startswith("_")}
        json.dump({"flags": flags, **summary}, f, indent=1)
    print(f"summary written to {path}")
    return 0
