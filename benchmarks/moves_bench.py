"""What live re-placement costs and what it gains: a move's bytes and seconds on CPU/gloo, and the busiest
inter-node link on a drifting co-activation trace, with and without moves.

How to run (2 CPU cores, about a minute):
    python benchmarks/moves_bench.py                          # H 1024, F 2816, EP 4; 8 experts on 2 x 4 ranks
    python benchmarks/moves_bench.py --hidden 512 --ffn 1408 --repeats 5

1. Move cost. One ``LargeEPMoE`` layer at EP 4 (one expert per rank, Adam stepped once, so every expert carries
   its weights, gradient and two moments), every expert sent to the mirrored rank with ``lep.move_experts``:
   the bytes each rank sends and the seconds of the move (the slowest rank; median over ``--repeats``).
2. Link load. A top-2 trace on 8 experts that drifts: each phase of ``--windows`` windows has 80 % of its tokens
   choose one of four expert pairs, and the pairs change from phase to phase. On 2 nodes of 4 ranks, the static
   layout (expert r on rank r) against ``plan_moves`` deciding after every window (on that window, as
   ``replace_every`` does; a window stands for ``--steps`` steps alike, the gain counted over them against the
   move's bytes on the topology's default links): the busiest inter-node link's token rows per dispatch on the
   next window, and the experts moved.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def _move_cost(rank: int, world_size: int, hidden: int, ffn: int, repeats: int) -> dict:
    import torch.distributed as dist

    import largeep_plugin as lep

    cfg = lep.LargeEPConfig(hidden_size=hidden, ffn_hidden_size=ffn, num_experts=world_size, top_k=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = lep.LargeEPMoE(cfg)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    layer(torch.randn(64, hidden)).square().mean().backward()
    lep.allreduce_gradients(layer)
    opt.step()
    seconds, sent = [], 0
    for _ in range(repeats):
        home = layer.home_layout()
        dist.barrier()
        start = time.perf_counter()
        sent = lep.move_experts(layer, tuple(home[world_size - 1 - r] for r in range(world_size)), opt)
        took = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        seconds.append(float(took))
    return {"bytes_per_rank": sent, "seconds": statistics.median(seconds)}


def _pairs_trace(pairs: list[tuple[int, int]], tokens: int, seed: int, num_experts: int = 8) -> torch.Tensor:
    """coact_EE of a top-2 window: 80 % of the tokens pick one of ``pairs``, the rest two experts at random."""
    gen = torch.Generator().manual_seed(seed)
    pick = torch.rand(tokens, generator=gen) < 0.8
    which = torch.randint(len(pairs), (tokens,), generator=gen)
    chosen = torch.zeros(tokens, num_experts, dtype=torch.float64)
    for t in range(tokens):
        a, b = pairs[int(which[t])] if bool(pick[t]) else torch.randperm(num_experts, generator=gen)[:2].tolist()
        chosen[t, a] = chosen[t, b] = 1.0
    return chosen.T @ chosen


PHASES = [[(0, 4), (1, 5), (2, 6), (3, 7)], [(0, 5), (1, 6), (2, 7), (3, 4)], [(0, 1), (2, 3), (4, 5), (6, 7)],
          [(0, 6), (1, 7), (2, 4), (3, 5)]]


def _link_trace(windows: int, tokens: int, hidden: int, ffn: int, steps: int) -> dict:
    from largeep_plugin.placement.moves import layout_figures, plan_moves
    from largeep_plugin.placement.topology import Topology

    topology = Topology.uniform(2, 4)
    row_bytes, expert_bytes = hidden * 4.0, 4.0 * (2 * hidden * ffn) * 4   # fc1, fc2 in fp32: weights, grad, 2 moments
    static = tuple((r,) for r in range(8))
    home, rows = static, {"static": [], "moves": []}
    moved = 0
    trace = [_pairs_trace(p, tokens, seed=10 * i + w) for i, p in enumerate(PHASES) for w in range(windows)]
    for w, coact in enumerate(trace):
        load = torch.diagonal(coact)
        for name, layout in (("static", static), ("moves", home)):
            _, links = layout_figures(layout, topology, load, coact, top_k=2, row_bytes=row_bytes)
            rows[name].append(max(links[0][1], links[1][0]))
        plan = plan_moves(home, topology, load, coact, top_k=2, row_bytes=row_bytes, expert_bytes=expert_bytes,
                          margin=0.05, window_steps=1, horizon_steps=steps)
        moved += len(plan.moves)
        home = plan.home
    return {"static": rows["static"], "moves": rows["moves"], "experts_moved": moved, "windows": len(trace)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--windows", type=int, default=3, help="windows per phase of the drifting trace")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step (one layer's, the world's)")
    parser.add_argument("--steps", type=int, default=100,
                        help="steps between decisions (replace_every): the gain is counted over them")
    args = parser.parse_args()
    from largeep_plugin.tools.launch import run_world

    cost = run_world(_move_cost, args.ranks, args=(args.hidden, args.ffn, args.repeats), timeout=600.0)[0]
    print(f"move: EP {args.ranks}, H {args.hidden}, F {args.ffn}: every expert to the mirrored rank, "
          f"{cost['bytes_per_rank'] / 2**20:.1f} MiB sent per rank (weights, gradient, Adam moments), "
          f"{cost['seconds']:.3f} s (slowest rank, median of {args.repeats}), "
          f"{cost['bytes_per_rank'] / 2**20 / cost['seconds']:.0f} MiB/s per rank")
    trace = _link_trace(args.windows, args.tokens, args.hidden, args.ffn, args.steps)
    print(f"drifting trace: {len(PHASES)} phases x {args.windows} windows of {args.steps} steps of {args.tokens} "
          "tokens, 8 experts on 2 nodes x 4 ranks, a decision after every window; busiest inter-node link, token "
          "rows per dispatch in each window:")
    print("  static: " + " ".join(f"{v:.0f}" for v in trace["static"]))
    print("  moves:  " + " ".join(f"{v:.0f}" for v in trace["moves"]))
    s, m = sum(trace["static"]), sum(trace["moves"])
    print(f"  mean {s / trace['windows']:.0f} -> {m / trace['windows']:.0f} rows ({s / m:.2f}x lighter), "
          f"{trace['experts_moved']} expert moves in {trace['windows']} decisions")


if __name__ == "__main__":
    main()
