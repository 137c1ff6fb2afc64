"""A rank program that trains a small MoE network, saves its training state every few steps and resumes from it when
started again: the lost-node drill on the emulated cluster (docs/moves.md, "A lost node").

    largeep cluster run --nodes 2 --ranks-per-node 2 --kill-node 1 --kill-at "line:step 5 start" --relaunch -- \\
        python -m largeep_plugin.cluster.train_worker --checkpoint /tmp/drill/ckpt --log /tmp/drill/losses.jsonl

The network: a dense projection, tanh, one large-EP layer of ``--experts`` experts in ``--groups`` routing groups
(group-limited routing: a token keeps its best group, then its top-2 experts inside it), trained with Adam and the
aux-loss-free bias updated every second step. Each start plans the placement for the nodes of its world with the
package's planner (``plan_placement`` with the routing groups: every group on one node; several experts per rank
when there are more experts than ranks), so a relaunch on fewer nodes gets a layout that keeps the same rules.

Step s trains on global batch s (seeded by s, split over the ranks of whatever world), so a run that resumes at
step s on the survivors sees the data of the run that never stopped. Rank 0 prints ``step S start`` before step S
(a marker ``NodeKill(on_line=...)`` can wait for) and appends one JSON line per step to ``--log``:
``{"step", "loss", "world", "time"}`` (the loss summed over the world), after a line ``{"start", "world", "nodes",
"placement", "time"}`` per start. With ``--checkpoint`` the training state is saved every ``--save-every`` steps
(``save_training_state``: atomic) and loaded at the start when there is one. ``timeline: up|loaded|caught-up``
lines feed the recovery timeline (recovery.py). The ranks run under a ``RankWatchdog``: when a peer is lost the
survivors stop with ``RankLostError`` naming it and exit with code 75, within ``--watchdog-timeout`` + 3 s.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import warnings
from contextlib import nullcontext
from typing import Any, Sequence

import torch
import torch.distributed as dist

from largeep_plugin.layer.comm import end_process
from largeep_plugin.layer.config import LargeEPConfig
from largeep_plugin.layer.grads import allreduce_gradients
from largeep_plugin.layer.moe_layer import LargeEPMoE, update_expert_biases
from largeep_plugin.layer.training_state import checkpoint_dir, load_training_state, save_training_state
from largeep_plugin.placement.plan import Placement, plan_placement
from largeep_plugin.placement.topology import Topology
from .recovery import timeline_mark
from .watchdog import EXIT_RANK_LOST, RankLostError, RankWatchdog


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m largeep_plugin.cluster.train_worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12, help="steps of the whole run (default 12)")
    p.add_argument("--save-every", type=int, default=2, help="checkpoint every N steps (default 2)")
    p.add_argument("--checkpoint", default="", help="checkpoint path (none: no saves, no resume)")
    p.add_argument("--log", default="", help="rank 0 appends the losses here, one JSON line per step")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--groups", type=int, default=2, help="routing groups (each kept on one node)")
    p.add_argument("--hidden-size", type=int, default=12)
    p.add_argument("--ffn-hidden-size", type=int, default=16)
    p.add_argument("--tokens", type=int, default=48, help="global tokens per step, split over the ranks")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--min-step-s", type=float, default=0.25,
                   help="pad every step to at least this long, as a real step would take (default 0.25)")
    p.add_argument("--watchdog-timeout", type=float, default=8.0,
                   help="seconds of silence before a peer is lost (0: no watchdog; default 8)")
    p.add_argument("--collective-timeout", type=float, default=120.0, help="torch.distributed timeout, seconds")
    args = p.parse_args(argv)
    for field in ("steps", "save_every", "experts", "groups", "hidden_size", "ffn_hidden_size", "tokens"):
        if getattr(args, field) < 1:
            p.error(f"--{field.replace('_', '-')} must be >= 1, got {getattr(args, field)}")
    if args.experts % args.groups:
        p.error(f"--groups {args.groups} must divide --experts {args.experts}")
    if args.min_step_s < 0 or args.watchdog_timeout < 0:
        p.error(f"--min-step-s {args.min_step_s} and --watchdog-timeout {args.watchdog_timeout} must be >= 0")
    return args


class DrillNet(torch.nn.Module):
    """A dense projection, tanh, then one large-EP layer placed by ``placement``."""

    def __init__(self, args: argparse.Namespace, placement: Placement):
        super().__init__()
        torch.manual_seed(0)
        cfg = LargeEPConfig(hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
                            num_experts=args.experts, top_k=2, num_groups=args.groups, group_topk=1,
                            bias_update_rate=1e-2, init_std=0.4)
        self.inp = torch.nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.moe = LargeEPMoE(cfg, placement=placement)

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        return self.moe(torch.tanh(self.inp(x_TH)))


def plan_for_this_world(args: argparse.Namespace, world: int) -> tuple[Placement, int]:
    """The placement for the nodes of this world (LOCAL_WORLD_SIZE ranks each) and the number of nodes."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if per_node < 1 or world % per_node:
        raise ValueError(f"LOCAL_WORLD_SIZE={per_node} must divide the world size {world}")
    nodes = world // per_node
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the colocation warning: the placement is printed instead
        placement = plan_placement(args.experts, Topology.uniform(nodes, per_node), allow_colocate=True,
                                   expert_groups=args.groups)
    return placement, nodes


def _append(log: str, record: dict[str, Any]) -> None:
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _done_before(log: str) -> int:
    """The last step an earlier run of this log finished (-1: none)."""
    if not log or not os.path.exists(log):
        return -1
    with open(log, encoding="utf-8") as f:
        steps = [json.loads(line).get("step", -1) for line in f if line.strip()]
    return max(steps, default=-1)


def train(args: argparse.Namespace, rank: int, world: int) -> None:
    placement, nodes = plan_for_this_world(args, world)
    net = DrillNet(args, placement)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    begin = 0
    if args.checkpoint and _has_checkpoint(args.checkpoint):
        begin = int(load_training_state(args.checkpoint, net, opt)["step"])
        print(timeline_mark("loaded"), flush=True)
    done_before = _done_before(args.log) if rank == 0 else -1
    if rank == 0:
        print(f"rank 0: {world} ranks on {nodes} node(s), experts by rank {list(map(list, placement.rank_to_experts))}, "
              f"from step {begin}", flush=True)
        if args.log:
            _append(args.log, {"start": begin, "world": world, "nodes": nodes,
                               "placement": [list(h) for h in net.moe.home_layout()], "time": time.time()})
        if begin > done_before >= 0:
            print(timeline_mark("caught-up"), flush=True)
    for step in range(begin, args.steps):
        t0 = time.monotonic()
        if rank == 0:
            print(f"step {step} start", flush=True)
        x_GH = torch.randn(args.tokens, args.hidden_size, generator=torch.Generator().manual_seed(1000 + step))
        part = x_GH.chunk(world)[rank]
        loss = (net(part) * torch.cos(part)).sum()
        loss.backward()
        allreduce_gradients(net, average=False)
        opt.step()
        if step % 2:
            update_expert_biases(net)
        opt.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0 and args.log:
            _append(args.log, {"step": step, "loss": float(total), "world": world, "time": time.time()})
        if rank == 0 and step == done_before:
            print(timeline_mark("caught-up"), flush=True)
        if args.checkpoint and (step + 1) % args.save_every == 0:
            save_training_state(args.checkpoint, net, opt, extra={"step": step + 1})
        time.sleep(max(0.0, args.min_step_s - (time.monotonic() - t0)))


def _has_checkpoint(path: str) -> bool:
    try:
        checkpoint_dir(path)
    except ValueError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.collective_timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    print(timeline_mark("up"), flush=True)
    watchdog = (RankWatchdog(rank=rank, world_size=world, timeout_s=args.watchdog_timeout,
                             interval_s=min(1.0, args.watchdog_timeout / 4), grace_s=2.0)
                if args.watchdog_timeout > 0 else nullcontext())
    try:
        with watchdog:
            train(args, rank, world)
    except RankLostError as err:
        print(f"rank {rank}: RankLostError: {err}", flush=True)
        sys.stdout.flush()
        os._exit(EXIT_RANK_LOST)  # the process group has a dead peer: no teardown that could wait for it
    end_process(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
