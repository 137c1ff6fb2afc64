"""``largeep bench overlap``: flat vs hierarchical dispatch (also on node and rail groups), overlap off vs 2/4/8
chunks, on the emulated cluster.

    largeep bench overlap                                   # 2 nodes x 4 ranks and 4 x 4 (EP 16), 1gbit links
    largeep bench overlap --clusters 2x4 --iters 5          # one cluster, more iterations
    largeep bench overlap --inter-bw 500mbit --output runs/overlap.json

Needs root and iproute2 (see ``largeep cluster check``). For every cluster shape it builds the emulated cluster
once and runs, in one job and side by side, every variant of the layer's forward+backward: each dispatch kind with
overlap off (1 chunk) and on (2, 4, 8 chunks), plus two calibrations per dispatch kind: the communication alone
(the same layer with an identity expert) and the expert's compute alone (on the rows it receives). With
hierarchical dispatch it also runs "hier+groups": hierarchical with its two stages on node and rail groups
(``build_node_groups``) instead of the whole EP group, for ``--node-group-chunks`` (default off and 2 chunks) plus
its own communication-alone calibration (the expert compute is the hierarchical one's). The variants are
interleaved: every round times one step of each, in turn, so a slow phase of the machine hits all of them alike.
Times are the median over ``--iters`` rounds of the slowest rank's step. Printed and written to JSON:

    hidden = (t_off - t_on) / t_comm     the share of the communication time the overlap hides
    inter-node MB                        bytes the nodes' links really carried per step (their tx counters)
    inter-node rows                      rows crossing nodes per dispatch, counted from the routing (all ranks)

On a machine with few cores the ranks' compute serialises (8 ranks on 2 cores compute 4 at a time at best), so
compute time is inflated relative to a GPU cluster; the inter-node link is real (tc), the intra-node one is
loopback and costs CPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from ..cluster import ClusterUnavailable, EmulatedCluster
from .flags import int_at_least, int_list, number
from largeep_plugin.layer.config import LargeEPConfig
from largeep_plugin.layer.hierarchical import NodeLayout, internode_rows
from largeep_plugin.layer.moe_layer import LargeEPMoE
from largeep_plugin.layer.process_groups import build_node_groups

# The variant name of hierarchical dispatch with its two stages on node and rail groups.
GROUPED = "hier+groups"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("overlap", help="flat vs hierarchical, overlap off vs on, on the emulated cluster",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clusters", default="2x4,4x4", help="NODESxRANKS shapes, comma-separated (default 2x4,4x4)")
    p.add_argument("--inter-bw", default="1gbit", help="inter-node bandwidth per node and direction (default 1gbit)")
    p.add_argument("--inter-latency", default="0", help="one-way inter-node latency (default 0; >0 needs netem)")
    pos = int_at_least(1)
    p.add_argument("--tokens", type=pos, default=256, help="tokens per rank (default 256)")
    p.add_argument("--hidden-size", type=pos, default=512, help="H (default 512)")
    p.add_argument("--ffn-hidden-size", type=pos, default=1024, help="expert FFN width (default 1024)")
    p.add_argument("--top-k", type=pos, default=4, help="experts per token (default 4)")
    p.add_argument("--chunks", type=int_list(1), default="1,2,4,8",
                   help="overlap_chunks values, 1 = off (default 1,2,4,8)")
    p.add_argument("--dispatch", default="flat,hierarchical", help="dispatch kinds (default flat,hierarchical)")
    p.add_argument("--node-group-chunks", default="1,2",
                   help="overlap_chunks of the hier+groups variant, must include 1; '' for none (default 1,2)")
    p.add_argument("--iters", type=pos, default=5, help="timed rounds, one step of every variant each (default 5)")
    p.add_argument("--warmup", type=int_at_least(0), default=2, help="untimed rounds first (default 2)")
    p.add_argument("--timeout", type=number(0.0, above=True), default=900.0,
                   help="seconds per cluster before it is killed (default 900)")
    p.add_argument("--output", default="runs/bench_overlap.json", help="JSON results (default runs/bench_overlap.json)")
    return p


def _spec_from_args(args: argparse.Namespace) -> tuple[list[tuple[int, int]], dict[str, Any]]:
    shapes = []
    for item in args.clusters.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--clusters item {item!r} is not NODESxRANKS like 2x4")
        shapes.append((int(parts[0]), int(parts[1])))
    chunks = args.chunks
    if 1 not in chunks:
        raise ValueError(f"--chunks={','.join(map(str, chunks))} must include 1 (overlap off, the baseline)")
    kinds = [d.strip() for d in args.dispatch.split(",")]
    if any(d not in ("flat", "hierarchical") for d in kinds):
        raise ValueError(f"--dispatch={args.dispatch!r}: each item is flat or hierarchical")
    items = [c.strip() for c in args.node_group_chunks.split(",") if c.strip()]
    if not all(c.isdigit() for c in items):
        raise ValueError(f"--node-group-chunks={args.node_group_chunks!r} must be a comma-separated list of integers")
    group_chunks = [int(c) for c in items]
    if "hierarchical" not in kinds:
        group_chunks = []  # node groups only exist for the hierarchical dispatch
    if group_chunks and (1 not in group_chunks or any(c < 1 for c in group_chunks)):
        raise ValueError(f"--node-group-chunks={args.node_group_chunks!r} must be positive and include 1 "
                         "(overlap off, the baseline of its hidden share)")
    spec = dict(tokens=args.tokens, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
                top_k=args.top_k, chunks=sorted(chunks), dispatch=kinds, node_group_chunks=sorted(group_chunks),
                iters=args.iters, warmup=args.warmup)
    return shapes, spec


def run(args: argparse.Namespace) -> int:
    try:
        shapes, spec = _spec_from_args(args)
    except ValueError as err:
        print(f"largeep bench overlap: {err}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"spec": spec, "inter_bw": args.inter_bw, "inter_latency": args.inter_latency,
                              "cpu_cores": os.cpu_count(), "torch": torch.__version__, "clusters": []}
    for nodes, rpn in shapes:
        if "hierarchical" in spec["dispatch"] and nodes < 2:
            print(f"largeep bench overlap: cluster {nodes}x{rpn} has one node; hierarchical needs two", file=sys.stderr)
            return 2
        if spec["top_k"] > nodes * rpn:
            print(f"largeep bench overlap: --top-k={spec['top_k']} exceeds the {nodes * rpn} experts of {nodes}x{rpn}",
                  file=sys.stderr)
            return 2
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            result_path = os.path.join(tmp, "result.json")
            cmd = [sys.executable, "-m", "largeep_plugin.commands.bench_overlap", "--spec", json.dumps(spec),
                   "--result", result_path]
            try:
                with EmulatedCluster(nodes, rpn, args.inter_bw, args.inter_latency) as cluster:
                    count = len(spec["dispatch"]) * (len(spec["chunks"]) + 2)
                    count += len(spec["node_group_chunks"]) + (1 if spec["node_group_chunks"] else 0)
                    print(f"cluster {nodes}x{rpn}: running {count} variants ...", flush=True)
                    res = cluster.run(cmd, timeout=args.timeout)
            except ClusterUnavailable as err:
                print(f"largeep bench overlap: needs the emulated cluster: {err}", file=sys.stderr)
                return 2
            if not res.ok or not os.path.exists(result_path):
                bad = res.first_failure if res.first_failure is not None else 0
                print(f"largeep bench overlap: cluster {nodes}x{rpn} failed: {res.summary()}\n"
                      f"last output of rank {bad}:\n{res.ranks[bad].output}", file=sys.stderr)
                return 1
            with open(result_path, encoding="utf-8") as f:
                cluster_result = json.load(f)
        cluster_result.update(nodes=nodes, ranks_per_node=rpn, wall_s=round(time.monotonic() - t0, 1))
        report["clusters"].append(cluster_result)
        print(format_table(cluster_result, spec, args.inter_bw, args.inter_latency), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.output}")
    return 0


def format_table(res: dict[str, Any], spec: dict[str, Any], bw: str, latency: str) -> str:
    """The printed table of one cluster shape."""
    nodes, rpn = res["nodes"], res["ranks_per_node"]
    lines = [
        f"\ncluster {nodes}x{rpn} (EP {nodes * rpn}), inter-node {bw} per node and direction, latency {latency}; "
        f"{spec['tokens']} tokens/rank, H={spec['hidden_size']}, F={spec['ffn_hidden_size']}, top-{spec['top_k']}; "
        f"median of {spec['iters']} rounds, slowest rank ({res['wall_s']} s)",
        f"{'dispatch':<13}{'chunks':>7}{'fwd+bwd ms':>12}{'vs flat off':>13}{'hidden':>9}{'inter-node MB':>15}",
    ]
    base = res["variants"][0]["ms"]
    for v in res["variants"]:
        hidden = "" if v["chunks"] == 1 else f"{100 * v['hidden']:.0f}%"
        lines.append(f"{v['dispatch']:<13}{'off' if v['chunks'] == 1 else v['chunks']:>7}{v['ms']:>12.1f}"
                     f"{base / v['ms']:>12.2f}x{hidden:>9}{v['inter_node_mb']:>15.2f}")
    for kind, cal in res["calibration"].items():
        lines.append(f"{kind}: communication alone {cal['comm_ms']:.1f} ms, expert compute alone {cal['compute_ms']:.1f} ms "
                     f"(comm/compute {cal['comm_ms'] / cal['compute_ms']:.2f})")
    rows = res["inter_node_rows"]
    lines.append(f"inter-node rows per dispatch (all ranks): flat {rows['flat']}, hierarchical {rows['hierarchical']}, "
                 f"dedup factor {rows['flat'] / max(1, rows['hierarchical']):.2f}")
    return "\n".join(lines)


# ---- the rank side (runs inside the emulated cluster) --------------------------------------------------------------
def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _link_bytes(local_rank: int) -> int:
    """This node's inter-node link counter (only local rank 0 reports, so the all-reduce sums over nodes)."""
    if local_rank != 0:
        return 0
    with open("/sys/class/net/eth0/statistics/tx_bytes", encoding="ascii") as f:
        return int(f.read())


def rank_main(spec: dict[str, Any], result_path: str) -> None:
    """Time every variant side by side: round r runs one step of each variant in turn, so slow phases of the
    machine hit all variants alike; per variant the median over rounds of the slowest rank's step time."""
    rank, world = dist.get_rank(), dist.get_world_size()
    rpn = int(os.environ["LOCAL_WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(spec["tokens"], spec["hidden_size"], generator=gen).requires_grad_(True)
    g = torch.randn(spec["tokens"], spec["hidden_size"], generator=gen)

    group_chunks = spec.get("node_group_chunks", [])
    # Collective (every rank, same order); built once and shared by the hier+groups layers, which run in turn.
    node_groups = build_node_groups(list(range(world)), rpn) if group_chunks else None

    def layer_for(dispatch: str, chunks: int) -> LargeEPMoE:
        grouped = dispatch == GROUPED
        cfg = LargeEPConfig(hidden_size=spec["hidden_size"], ffn_hidden_size=spec["ffn_hidden_size"],
                            num_experts=world, top_k=spec["top_k"], dispatch="hierarchical" if grouped else dispatch,
                            overlap_chunks=chunks)
        return LargeEPMoE(cfg, ranks_per_node=rpn if dispatch != "flat" else None,
                          node_groups=node_groups if grouped else None)

    def layer_step(layer: nn.Module) -> Callable[[], None]:
        def step() -> None:
            x.grad = None
            layer.zero_grad(set_to_none=True)
            (layer(x) * g).sum().backward()
        return step

    # The variants, and per dispatch kind two calibrations: an identity expert (communication and local work
    # only) and the expert alone on the rows it receives.
    steps: dict[tuple[str, Any], Callable[[], None]] = {}
    for dispatch in spec["dispatch"]:
        for chunks in spec["chunks"]:
            steps[(dispatch, chunks)] = layer_step(layer_for(dispatch, chunks))
        comm_layer = layer_for(dispatch, 1)
        expert = comm_layer.expert
        comm_layer.expert = nn.Identity()
        steps[(dispatch, "comm")] = layer_step(comm_layer)
        probe = layer_for(dispatch, 1)
        probe(x.detach())
        rows = torch.randn(int(probe.last_stats.tokens_per_expert_E[probe.expert_id]), spec["hidden_size"],
                           requires_grad=True)
        steps[(dispatch, "compute")] = lambda expert=expert, rows=rows: expert(rows).sum().backward()
        if dispatch == "hierarchical" and group_chunks:
            # Right after plain hierarchical, so the two are timed back to back in every round.
            for chunks in group_chunks:
                steps[(GROUPED, chunks)] = layer_step(layer_for(GROUPED, chunks))
            comm_layer = layer_for(GROUPED, 1)
            comm_layer.expert = nn.Identity()
            steps[(GROUPED, "comm")] = layer_step(comm_layer)

    times: dict[tuple[str, Any], list[float]] = {key: [] for key in steps}
    moved: dict[tuple[str, Any], float] = {key: 0.0 for key in steps}
    for round_ in range(spec["warmup"] + spec["iters"]):
        for key, step in steps.items():
            dist.barrier()
            before = _link_bytes(local_rank)
            t0 = time.perf_counter()
            step()
            elapsed = time.perf_counter() - t0
            slowest = _slowest(elapsed)
            if round_ >= spec["warmup"]:
                times[key].append(slowest)
                moved[key] += _link_bytes(local_rank) - before
    med = {key: 1e3 * statistics.median(v) for key, v in times.items()}
    sent = torch.tensor([moved[key] for key in steps], dtype=torch.float64)
    dist.all_reduce(sent)
    mb = {key: float(b) / spec["iters"] / 1e6 for key, b in zip(steps, sent)}

    variants, calibration = [], {}
    kinds = [(d, spec["chunks"]) for d in spec["dispatch"]]
    if group_chunks:
        kinds.insert(spec["dispatch"].index("hierarchical") + 1, (GROUPED, group_chunks))
    for dispatch, chunk_list in kinds:
        comm_ms, off_ms = med[(dispatch, "comm")], med[(dispatch, 1)]
        # The expert and the rows it receives are the same with or without node groups.
        compute = med[("hierarchical" if dispatch == GROUPED else dispatch, "compute")]
        calibration[dispatch] = dict(comm_ms=comm_ms, compute_ms=compute)
        for chunks in chunk_list:
            ms = med[(dispatch, chunks)]
            variants.append(dict(dispatch=dispatch, chunks=chunks, ms=ms, hidden=(off_ms - ms) / comm_ms,
                                 inter_node_mb=mb[(dispatch, chunks)], all_ms=[1e3 * t for t in times[(dispatch, chunks)]]))

    # Rows crossing nodes per dispatch, from the routing of the benchmark's tokens.
    routing = layer_for("flat", 1).router(x.detach())
    counts = torch.tensor(internode_rows(routing.topk_ids_TK, routing.keep_TK, rank,
                                         NodeLayout(num_ranks=world, ranks_per_node=rpn)), dtype=torch.float64)
    dist.all_reduce(counts)
    if rank == 0:
        out = dict(variants=variants, calibration=calibration,
                   inter_node_rows=dict(flat=int(counts[0]), hierarchical=int(counts[1])))
        with open(result_path, "w", encoding="utf-8") as f:
            json.dump(out, f)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry of one rank: ``python -m largeep_plugin.commands.bench_overlap --spec JSON --result PATH``."""
    p = argparse.ArgumentParser(prog="bench_overlap rank")
    p.add_argument("--spec", required=True)
    p.add_argument("--result", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    try:
        rank_main(json.loads(args.spec), args.result)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
