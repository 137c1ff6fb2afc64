"""A rank program that runs the large-EP MoE layer forward and backward, for the emulated cluster (or torchrun).

    largeep cluster run --nodes 2 --ranks-per-node 2 -- python -m largeep_plugin.cluster.layer_worker \\
        --dispatch hierarchical --chunks 2 --check
    largeep cluster run --nodes 2 --ranks-per-node 4 -- python -m largeep_plugin.cluster.layer_worker \\
        --dispatch hierarchical --node-groups --check        # the two stages on node and rail groups
    largeep cluster run --nodes 2 --ranks-per-node 2 -- python -m largeep_plugin.cluster.layer_worker \\
        --steps 1000 --watchdog-timeout 3 --die-rank 3 --die-step 2       # fault injection

It reads the torchrun variables (RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), builds one
``LargeEPMoE`` with one expert per rank (ranks_per_node = LOCAL_WORLD_SIZE) and runs ``--steps`` forward+backward
steps on seeded tokens. ``--check`` compares the output, the input gradient and the expert's gradients with the
dense reference on the same global batch and fails when they differ. ``--node-groups`` (hierarchical only)
builds the node and rail groups with ``build_node_groups`` on every rank and runs the two stages on them. ``--die-rank R --die-step S`` makes rank R
kill itself (SIGKILL, no goodbye; or raise ``InjectedFault`` with ``--die-mode raise``) at the start of step S:
with ``--watchdog-timeout`` the other ranks must then stop with ``RankLostError`` naming R and exit with code 75.
"""
from __future__ import annotations

import argparse
import datetime
import os
import signal
import sys
from typing import Sequence

import torch
import torch.distributed as dist

from largeep_plugin.layer.config import LargeEPConfig
from largeep_plugin.layer.moe_layer import LargeEPMoE
from largeep_plugin.layer.process_groups import build_node_groups
from largeep_plugin.layer.reference import DenseMoEReference
from .watchdog import EXIT_RANK_LOST, RankLostError, RankWatchdog


class InjectedFault(Exception):
    """The error ``--die-mode raise`` raises on the chosen rank."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m largeep_plugin.cluster.layer_worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=32)
    p.add_argument("--ffn-hidden-size", type=int, default=64)
    p.add_argument("--tokens", type=int, default=48, help="tokens per rank (rank r gets tokens + r)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dispatch", choices=("flat", "hierarchical"), default="flat")
    p.add_argument("--chunks", type=int, default=1, help="overlap_chunks")
    p.add_argument("--node-groups", action="store_true",
                   help="hierarchical only: run stage 1 on the rail group and stage 2 on the node group")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--check", action="store_true", help="compare with the dense reference (fails above --tol)")
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--collective-timeout", type=float, default=120.0, help="torch.distributed timeout, seconds")
    p.add_argument("--watchdog-timeout", type=float, default=0.0, help="seconds of silence before a rank is lost (0: no watchdog)")
    p.add_argument("--die-rank", type=int, default=-1, help="fault injection: this rank kills itself ...")
    p.add_argument("--die-step", type=int, default=-1, help="... at the start of this step")
    p.add_argument("--die-mode", choices=("kill", "raise"), default="kill",
                   help="kill: SIGKILL itself (default); raise: raise InjectedFault instead")
    return p.parse_args(argv)


def _step_batch(args: argparse.Namespace, world: int, step: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    counts = [args.tokens + r for r in range(world)]
    gen = torch.Generator().manual_seed(1000 + step)
    return counts, torch.randn(sum(counts), args.hidden_size, generator=gen), torch.randn(sum(counts), args.hidden_size, generator=gen)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = float(want.abs().max()) or 1.0
    return float((got - want).abs().max()) / scale


def run_rank(args: argparse.Namespace) -> float:
    """The steps of one rank; returns the worst relative error against the reference (0 without --check)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = LargeEPConfig(hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size, num_experts=world,
                        top_k=args.top_k, dispatch=args.dispatch, overlap_chunks=args.chunks, init_std=0.4)
    rpn = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    # build_node_groups is collective: every rank creates every node and rail group, in the same order.
    groups = build_node_groups(list(range(world)), rpn) if args.node_groups else None
    layer = LargeEPMoE(cfg, ranks_per_node=rpn if args.dispatch == "hierarchical" else None, node_groups=groups)
    ref = DenseMoEReference(cfg) if args.check else None
    worst = 0.0
    for step in range(args.steps):
        if rank == args.die_rank and step == args.die_step:
            print(f"rank {rank}: fault injection ({args.die_mode}) at step {step}", flush=True)
            if args.die_mode == "raise":
                raise InjectedFault(f"injected fault on rank {rank} at step {step}")
            os.kill(os.getpid(), signal.SIGKILL)
        counts, x_GH, g_GH = _step_batch(args, world, step)
        lo = sum(counts[:rank])
        own = slice(lo, lo + counts[rank])
        layer.zero_grad()
        x = x_GH[own].clone().requires_grad_(True)
        y = layer(x)
        (y * g_GH[own]).sum().backward()
        if ref is not None:
            ref.zero_grad()
            x_ref = x_GH.clone().requires_grad_(True)
            y_ref = ref(x_ref)
            (y_ref * g_GH).sum().backward()
            errs = [_rel(y.detach(), y_ref.detach()[own]), _rel(x.grad, x_ref.grad[own])]
            want = dict(ref.experts[layer.expert_id].named_parameters())
            errs += [_rel(p.grad, want[n].grad) for n, p in layer.expert.named_parameters()]
            worst = max(worst, *errs)
        print(f"rank {rank}: step {step} done", flush=True)
    return worst


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.node_groups and args.dispatch != "hierarchical":
        raise ValueError(f"--node-groups needs --dispatch hierarchical, got --dispatch {args.dispatch}")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.collective_timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        if args.watchdog_timeout > 0:
            with RankWatchdog(rank=rank, world_size=world, timeout_s=args.watchdog_timeout,
                              interval_s=min(1.0, args.watchdog_timeout / 4), grace_s=5.0):
                worst = run_rank(args)
        else:
            worst = run_rank(args)
    except RankLostError as err:
        print(f"rank {rank}: RankLostError: {err}", flush=True)
        return EXIT_RANK_LOST
    if args.check:
        verdict = "ok" if worst <= args.tol else "MISMATCH"
        print(f"rank {rank}: max relative error vs dense reference {worst:.2e} ({verdict})", flush=True)
        if worst > args.tol:
            return 1
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
