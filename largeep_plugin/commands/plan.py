"""``largeep plan``: plan where experts go on a cluster and compare with naive, Megatron-style and EPLB-style layouts.

    largeep plan --topology examples/topologies/2x8_h100.yaml --num-experts 16 \\
        --load runs/demo/load.json --coactivation runs/demo/coactivation.json --top-k 2 --out runs/plan
    largeep plan --compare --out runs/plan_compare        # the benchmark of docs/placement.md

File formats (docs/placement.md): load: a JSON list of E numbers or {"tokens_per_expert": [...]};
co-activation: an E x E JSON list or {"coactivation": [[...]]}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

from largeep_plugin.placement.plan import Placement, eplb_placement, megatron_placement, naive_placement, plan_placement
from largeep_plugin.tools.docs_quick import shorten
from largeep_plugin.tools.placement_bench import (BASELINES, CompareResult, compare, compare_group_routing,
                                                  format_group_table, format_table, synthetic_trace,
                                            target_report, trace_stats)
from largeep_plugin.placement.files import read_json
from largeep_plugin.placement.topology import Topology, load_topology
from .flags import int_at_least, number


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="plan expert placement on a topology; --compare runs the benchmark",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", help="topology YAML (examples/topologies/); with --compare default: 2x8 and 4x4")
    p.add_argument("--num-experts", type=int_at_least(1),
                   help="E (default: the length of --load; with --compare 16, 8 and 4)")
    p.add_argument("--load", help="JSON tokens per expert")
    p.add_argument("--coactivation", help="JSON E x E tokens that chose both experts")
    p.add_argument("--top-k", type=int_at_least(1), default=None,
                   help="experts per token the files were recorded with (with --compare default 2)")
    p.add_argument("--expert-bytes", type=number(0.0, above=True), default=None, help="bytes one expert needs on a GPU")
    p.add_argument("--allow-colocate", action="store_true", help="allow several experts per GPU when E > GPUs")
    p.add_argument("--bytes-per-token", type=number(0.0, above=True), default=8192.0,
                   help="bytes of one token on the wire (default 8192: hidden 4096 in bf16)")
    p.add_argument("--compare", action="store_true", help="run the benchmark (synthetic Zipf traces)")
    p.add_argument("--tokens", type=int_at_least(1), default=16384, help="tokens of each synthetic trace (--compare)")
    p.add_argument("--restarts", type=int_at_least(1), default=32,
                   help="random restarts of the reference search (--compare)")
    p.add_argument("--out", help="directory for the JSON and PNG files")
    return p


def read_json_vector(path: str, key: str) -> Any:
    """A JSON file holding either the bare value or ``{key: value}`` (no other key)."""
    data = read_json(path)
    if isinstance(data, dict):
        if set(data) != {key}:
            raise ValueError(f"{path}: expected a list or {{\"{key}\": ...}}, got keys {sorted(data)}")
        data = data[key]
    if not isinstance(data, list):
        raise ValueError(f"{path}: {key} must be a JSON list, got {type(data).__name__}")
    return data


def run(args: argparse.Namespace) -> int:
    try:
        return _compare(args) if args.compare else _plan(args)
    except (ValueError, NotImplementedError, OSError) as err:
        print(f"largeep plan: error: {err}", file=sys.stderr)
        return 2


def _inputs(args: argparse.Namespace) -> tuple[Any, Any, int | None]:
    load = read_json_vector(args.load, "tokens_per_expert") if args.load else None
    coact = read_json_vector(args.coactivation, "coactivation") if args.coactivation else None
    num_experts = args.num_experts if args.num_experts is not None else (len(load) if load is not None else None)
    return load, coact, num_experts


def _plan(args: argparse.Namespace) -> int:
    load, coact, num_experts = _inputs(args)
    if args.topology is None or num_experts is None:
        raise ValueError("give --topology and --num-experts (or --load), or use --compare")
    topology = load_topology(args.topology)
    ours = plan_placement(num_experts, topology, load=load, coactivation=coact,
                          expert_bytes=args.expert_bytes, allow_colocate=args.allow_colocate, top_k=args.top_k)
    placements: dict[str, Placement] = {}
    if num_experts <= topology.world_size:   # the baselines are one expert per GPU too
        placements = {"naive": naive_placement(num_experts, topology),
                      "megatron": megatron_placement(num_experts, topology),
                      "eplb": eplb_placement(num_experts, topology, load)}
    placements["ours"] = ours
    figures = {k: p.figures(load, coact, top_k=args.top_k, bytes_per_token=args.bytes_per_token)
               for k, p in placements.items()}
    print(f"topology {topology.name}: {topology.num_nodes} nodes, {topology.world_size} GPUs; {num_experts} experts; "
          f"expert-TP {ours.expert_tp_degree}; top-k {args.top_k or 'unknown'}")
    print(describe(ours))
    print(figures_table(figures))
    if args.out:
        from largeep_plugin.tools.placement_charts import plot_placement   # matplotlib only when a PNG is asked for
        os.makedirs(args.out, exist_ok=True)
        out = {"placement": ours.to_dict(), "top_k": args.top_k, "bytes_per_token": args.bytes_per_token,
               "figures": {k: f.to_dict() for k, f in figures.items()}}
        _write_json(os.path.join(args.out, "plan.json"), out)
        png = plot_placement(ours, figures, os.path.join(args.out, "placement.png"))
        print(f"wrote {os.path.join(args.out, 'plan.json')} and {png}")
    return 0


def describe(placement: Placement) -> str:
    """The plan as text: experts per rank, node by node, then the replicated experts."""
    topo = placement.topology
    lines = ["plan (rank:expert, by node):"]
    for node in range(topo.num_nodes):
        cells = [f"{r}:{','.join(map(str, placement.rank_to_experts[r])) or '-'}" for r in topo.ranks_of(node)]
        lines.append(f"  {topo.nodes[node].name:<10} " + " ".join(cells))
    replicated = [f"e{x} x{n}" for x, n in enumerate(placement.num_replicas) if n > 1]
    if replicated:
        lines.append("replicas: " + ", ".join(replicated))
    return "\n".join(lines)


def figures_table(figures: dict[str, Any]) -> str:
    names = list(figures)
    rows = [("max GPU load (tokens)", lambda f: f"{f.max_gpu_load:.1f}"),
            ("max GPU / mean", lambda f: f"{f.gpu_imbalance:.3f}"),
            ("max link MB", lambda f: f"{f.max_link_bytes / 1e6:.2f}"),
            ("max link (from->to)", lambda f: "{}->{}".format(*f.max_link) if f.max_link_bytes > 0 else "-"),
            ("max link time us", lambda f: f"{f.max_link_seconds * 1e6:.1f}"),
            ("total inter-node MB", lambda f: f"{f.total_internode_bytes / 1e6:.2f}")]
    lines = [f"{'':<24}" + "".join(f"{n:>12}" for n in names)]
    for label, fmt in rows:
        lines.append(f"{label:<24}" + "".join(f"{fmt(figures[n]):>12}" for n in names))
    return "\n".join(lines)


def _compare(args: argparse.Namespace) -> int:
    shorten(args, restarts=1, tokens=1024)
    top_k = args.top_k or 2
    topologies = [load_topology(args.topology)] if args.topology else [Topology.uniform(2, 8), Topology.uniform(4, 4)]
    expert_counts = [args.num_experts] if args.num_experts else [16, 8, 4]
    results: list[CompareResult] = []
    for topo in topologies:
        for e in expert_counts:
            for zipf in (1.0, 1.2):
                ids = synthetic_trace(e, zipf=zipf, top_k=top_k, num_tokens=args.tokens, seed=0)
                load, coact = trace_stats(ids, e)
                results.append(compare(f"{topo.name} zipf{zipf} k{top_k}", topo, e, load, coact, top_k=top_k,
                                       bytes_per_token=args.bytes_per_token, restarts=args.restarts, trace_TK=ids))
                print(f"  done: {results[-1].label} E={e}", file=sys.stderr)
        if args.load:
            load, coact, e = _inputs(args)
            results.append(compare(f"{topo.name} recorded", topo, e, load, coact, top_k=args.top_k,
                                   bytes_per_token=args.bytes_per_token, restarts=args.restarts))
    print(format_table(results))
    print(target_report(results))
    # Group-limited routing (as DeepSeek-V3: 8 groups; a token keeps half as many groups as there are nodes): the
    # plan that keeps each routing group on one node against the same planner ignoring the groups, same trace.
    groups = []
    for topo in topologies:
        kept = max(1, topo.num_nodes // 2)
        for e in [n for n in expert_counts if n % 8 == 0 and n >= 16 and top_k <= kept * (n // 8)]:
            groups.append(compare_group_routing(f"{topo.name} zipf1.0 k{top_k}", topo, e, 8, kept, zipf=1.0,
                                                top_k=top_k, bytes_per_token=args.bytes_per_token,
                                                num_tokens=args.tokens))
    if groups:
        print(format_group_table(groups))
    if args.out:
        from largeep_plugin.tools.placement_charts import plot_compare   # matplotlib only when a PNG is asked for
        os.makedirs(args.out, exist_ok=True)
        cases = [{"label": r.label, "num_experts": r.num_experts, "topology": r.topology.to_dict(),
                  "figures": {k: f.to_dict() for k, f in r.figures.items()},
                  "replay_max_link_bytes": r.replay_max_link_bytes, "ours": r.ours.to_dict()} for r in results]
        _write_json(os.path.join(args.out, "compare.json"), {"top_k": top_k, "cases": cases,
                                                             "group_limited": [dataclasses.asdict(g) for g in groups]})
        keys = (*BASELINES, "ours")
        png = plot_compare([f"{r.label} E{r.num_experts}" for r in results],
                           [{k: r.figures[k] for k in keys} for r in results], os.path.join(args.out, "compare.png"))
        print(f"wrote {os.path.join(args.out, 'compare.json')} and {png}")
    return 0


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
