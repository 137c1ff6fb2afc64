"""Live re-placement on the core layer (``largeep_plugin/layer/moves.py``, ``placement/moves.py``).

    * the planner, pure: a co-activation that pairs experts across nodes is fixed by moves that put each pair on
      one node; nothing moves on one node, under the margin, or when the bytes would not pay within the horizon;
      the same input gives the same plan; static replicas are refused;
    * a move between steps 3 and 4 of ten (Adam, bias updates on, EP 4 and EP 8; one expert per rank, colocated,
      with dynamic replicas): the per-step losses, the final parameters and Adam's moments and step counts of every
      expert equal the run that never moved (1e-6), the bias too, and the experts did change ranks;
    * the planner inside the layer: ``replace_every=3`` on a router that chooses cross-node pairs (2 nodes): the
      decision after step 3 moves the experts, the records say what moved where, the bytes, the predicted link
      load and, at the next decision, the measured one (lower than before the move); the losses equal the run
      with ``replace_every=0``;
    * refusals: ``replace_every`` with static replicas, expert TP, group-limited routing; ``rebalance`` without
      the optimizer; data-parallel copies without ``dp_group``.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from conftest import make_config, world
from largeep_plugin.placement.moves import check_movable, plan_moves
from largeep_plugin.placement.topology import Link, Topology

STEPS, TOKENS, LR = 10, 24, 1e-2


# ---- the planner -----------------------------------------------------------------------------------------------------

def _pair_trace(num_experts: int, pairs: list[tuple[int, int]], tokens: int = 4000, seed: int = 0) -> torch.Tensor:
    """coact_EE of a top-2 trace: 80% of the tokens pick one of ``pairs``, the rest two experts at random."""
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.zeros(tokens, num_experts, dtype=torch.float64)
    for t in range(tokens):
        if float(torch.rand(1, generator=gen)) < 0.8:
            a, b = pairs[int(torch.randint(len(pairs), (1,), generator=gen))]
        else:
            a, b = torch.randperm(num_experts, generator=gen)[:2].tolist()
        chosen[t, a] = chosen[t, b] = 1.0
    return chosen.T @ chosen


def _plan(home, topology, coact, **kw):  # type: ignore[no-untyped-def]
    args = dict(top_k=2, row_bytes=512.0, expert_bytes=1e6, margin=0.05, horizon_steps=10)
    args.update(kw)
    return plan_moves(home, topology, torch.diagonal(coact), coact, **args)


def test_planner_puts_coactivated_pairs_on_one_node() -> None:
    topology = Topology.uniform(2, 4)
    coact = _pair_trace(8, [(0, 4), (1, 5), (2, 6), (3, 7)])
    home = tuple((r,) for r in range(8))
    plan = _plan(home, topology, coact)
    assert plan.worth and plan.moves
    node = {e: topology.node_of(r) for r, h in enumerate(plan.home) for e in h}
    assert all(node[a] == node[a + 4] for a in range(4)), plan.home
    assert plan.link_seconds_after < 0.7 * plan.link_seconds_before
    # only what had to move moved: four experts (two per node), each to a rank its node freed
    assert len(plan.moves) == 4 and plan.move_bytes == 4e6
    moved = {x for x, _, _ in plan.moves}
    assert all(plan.home[b] == (x,) for x, _, b in plan.moves)
    assert [h for r, h in enumerate(plan.home) if h[0] not in moved] == [(r,) for r in range(8) if r not in moved]
    assert plan == _plan(home, topology, coact)   # deterministic
    # colocated homes move as units: every rank keeps its count
    home2 = ((0, 1), (2, 3), (4, 5), (6, 7))
    coact2 = _pair_trace(8, [(0, 4), (1, 5), (2, 6), (3, 7)])
    plan2 = _plan(home2, Topology.uniform(2, 2), coact2)
    assert sorted(len(h) for h in plan2.home) == [2, 2, 2, 2]
    assert sorted(x for h in plan2.home for x in h) == list(range(8))


def test_planner_keeps_the_layout_when_a_move_does_not_pay() -> None:
    topology = Topology.uniform(2, 4)
    home = tuple((r,) for r in range(8))
    crossing = _pair_trace(8, [(0, 4), (1, 5), (2, 6), (3, 7)])
    # already good: pairs on one node
    good = _plan(home, topology, _pair_trace(8, [(0, 1), (2, 3), (4, 5), (6, 7)]))
    assert not good.worth and good.moves == () and good.home == home
    # one node: no inter-node link to relieve
    one = _plan(home, Topology.uniform(1, 8), crossing)
    assert not one.worth and one.moves == ()
    # a margin above the gain
    high = _plan(home, topology, crossing, margin=0.9)
    assert not high.worth and high.candidate_moves and high.home == home
    # bytes that the next steps cannot repay
    costly = _plan(home, topology, crossing, expert_bytes=1e15, horizon_steps=1)
    assert not costly.worth and costly.move_seconds > costly.link_seconds_before


def test_planner_refuses_static_replicas() -> None:
    with pytest.raises(NotImplementedError, match=r"experts \[0\] on several ranks"):
        check_movable(((0,), (0,), (1,), (2,)), 3)


# ---- a move inside training -------------------------------------------------------------------------------------

def _train(rank: int, ws: int, config: dict, move_at: int | None, replace: dict | None = None) -> dict:
    """Ten Adam steps of one layer (this rank's share of a fixed global batch); a move of every expert to the
    mirrored rank after the optimizer step of step index ``move_at`` (2: between steps 3 and 4), or the planner's
    (``replace``). Returns the per-step
    global loss, each expert's parameters and Adam state by expert id, the bias, the layouts and records."""
    import torch.distributed as dist

    import largeep_plugin as lep
    from largeep_plugin.placement.plan import Placement

    fields = dict(config)
    num_experts = fields.pop("num_experts")
    ranks_per_node = fields.pop("ranks_per_node", None)
    fields.update(replace or {})
    cfg = make_config(num_experts, top_k=2, bias_update_rate=1e-2, **fields)
    placement = None
    if ranks_per_node is not None:
        # two nodes joined by a slow link without latency: this tiny layer's rows and moves are then in proportion
        # to a large model's (a 5 us latency would dwarf both)
        slow = Link(bandwidth_gbytes_per_s=1e-3, latency_us=0.0)
        placement = Placement.identity(num_experts, Topology.uniform(ws // ranks_per_node, ranks_per_node,
                                                                     inter_node=slow))
    elif num_experts != ws:
        per = num_experts // ws
        placement = Placement(topology=Topology.uniform(1, ws), num_experts=num_experts,
                              rank_to_experts=tuple(tuple(range(r * per, (r + 1) * per)) for r in range(ws)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = lep.LargeEPMoE(cfg, placement=placement)
    _steer_router(layer, ranks_per_node)
    opt = torch.optim.Adam(layer.parameters(), lr=LR)
    out: dict = {"losses": [], "layouts": [layer.home_layout()], "records": []}
    for step in range(STEPS):
        x = _tokens(step, cfg.hidden_size, ranks_per_node).chunk(ws)[rank]
        loss = (layer(x) * torch.sin(x)).sum()
        loss.backward()
        lep.allreduce_gradients(layer, average=False)
        opt.step()
        lep.update_expert_biases(layer)
        if step == move_at:
            home = layer.home_layout()
            lep.move_experts(layer, tuple(home[ws - 1 - r] for r in range(ws)), opt)
        out["records"] += lep.rebalance(layer, opt)
        opt.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        out["losses"].append(float(total))
        out["layouts"].append(layer.home_layout())
    out["experts"] = {e: {n: (p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone(),
                              float(opt.state[p]["step"])) for n, p in m.named_parameters()}
                      for e, m in layer.local_experts()}
    out["bias"] = layer.router.expert_bias.clone()
    return out


def _tokens(step: int, hidden: int, ranks_per_node: int | None) -> torch.Tensor:
    """The global batch of a step: random rows, or (two nodes) rows along two directions the steered router sends
    to cross-node pairs of experts."""
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = TOKENS if ranks_per_node is None else 4 * TOKENS
    x = torch.randn(tokens, hidden, generator=gen)
    if ranks_per_node is None:
        return x
    sign = torch.where(torch.arange(tokens) % 2 == 0, 1.0, -1.0).view(-1, 1)
    direction = torch.zeros(hidden)
    direction[0] = 3.0
    return 0.3 * x + sign * direction


def _steer_router(layer, ranks_per_node: int | None) -> None:  # type: ignore[no-untyped-def]
    """On two nodes of P ranks: expert e and e + P (one on each node) both like direction +d0 for even e, -d0
    for odd e, so the tokens choose cross-node pairs."""
    if ranks_per_node is None:
        return
    e = layer.config.num_experts
    with torch.no_grad():
        for x in range(e):
            sign = 1.0 if (x % ranks_per_node) % 2 == 0 else -1.0
            layer.router.weight[x, 0] = sign * (2.0 - 0.1 * (x % ranks_per_node) - 0.05 * (x // ranks_per_node))


def _compare(a: list[dict], b: list[dict]) -> dict:
    def merged(runs: list[dict]) -> dict:
        return {e: v for run in runs for e, v in run["experts"].items()}

    ea, eb = merged(a), merged(b)
    loss = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a[0]["losses"], b[0]["losses"]))
    worst = {"loss": loss, "param": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0, "step": 0.0}
    for e in ea:
        for name, (p, m, v, s) in ea[e].items():
            q, n, w, t = eb[e][name]
            worst["param"] = max(worst["param"], float((p - q).abs().max() / p.abs().max()))
            worst["exp_avg"] = max(worst["exp_avg"], float((m - n).abs().max() / m.abs().max().clamp_min(1e-30)))
            worst["exp_avg_sq"] = max(worst["exp_avg_sq"], float((v - w).abs().max() / v.abs().max().clamp_min(1e-30)))
            worst["step"] = max(worst["step"], abs(s - t))
    worst["bias"] = float((a[0]["bias"] - b[0]["bias"]).abs().max())
    return worst


CASES = {
    "ep4": dict(num_experts=4),
    "ep4_clones": dict(num_experts=4, dynamic_replicas=1),
    "ep4_colocated": dict(num_experts=8),
}


def _moved_runs(rank: int, ws: int, cases: dict) -> dict:
    return {name: (_train(rank, ws, case, None), _train(rank, ws, case, 2)) for name, case in cases.items()}


@pytest.mark.parametrize("ws,cases", [(4, CASES), (8, {"ep8": dict(num_experts=8)})])
def test_a_move_is_the_same_math(ws: int, cases: dict) -> None:
    per_rank = world(_moved_runs, ws, cases, timeout=600)
    for name in cases:
        still, moved = [r[name][0] for r in per_rank], [r[name][1] for r in per_rank]
        layouts = moved[0]["layouts"]   # [i]: after step i - 1
        assert layouts[2] == layouts[0] and layouts[3] != layouts[0] and layouts[-1] == layouts[3], name
        worst = _compare(still, moved)
        assert all(v <= 1e-6 for v in worst.values()), f"{name}: {worst}"


def _planned_runs(rank: int, ws: int, case: dict) -> dict:
    return {"still": _train(rank, ws, case, None), "planned": _train(rank, ws, case, None, {"replace_every": 3})}


@pytest.mark.parametrize("ws,case", [(4, dict(num_experts=4, ranks_per_node=2)),
                                     (8, dict(num_experts=8, ranks_per_node=4, dynamic_replicas=1))])
def test_the_planner_moves_cross_node_pairs_together(ws: int, case: dict) -> None:
    per_rank = world(_planned_runs, ws, case, timeout=600)
    planned = per_rank[0]["planned"]
    moves = [r for r in planned["records"] if r.get("kind") == "move"]
    assert [r["step"] for r in moves] == [3, 6, 9]
    first = moves[0]
    assert first["moved"], first
    assert first["bytes"] > 0 and first["seconds"] >= 0 and first["predicted_gain"] > 0.05
    assert first["predicted_link_seconds_after"] < first["predicted_link_seconds_before"]
    # the next window ran on the new layout: its measured busiest link is lighter than the window before the move
    assert moves[1]["measured_max_link_tokens"] < first["measured_max_link_tokens"], moves
    assert not moves[1]["moved"] and not moves[2]["moved"]   # settled: nothing worth moving any more
    assert planned["layouts"][3] != planned["layouts"][2] == planned["layouts"][0]   # moved after step 3
    assert all(v <= 1e-6 for v in _compare([r["still"] for r in per_rank],
                                           [r["planned"] for r in per_rank]).values())


def _refusals(rank: int, ws: int) -> dict:
    import largeep_plugin as lep
    from largeep_plugin.layer.process_groups import build_process_groups
    from largeep_plugin.placement.plan import Placement

    out = {}

    def catch(fn):  # type: ignore[no-untyped-def]
        try:
            fn()
        except (ValueError, NotImplementedError) as e:
            return f"{type(e).__name__}: {e}"
        return "no error"

    replicas = Placement(topology=Topology.uniform(1, ws), num_experts=2, rank_to_experts=((0,), (0,), (1,), (1,)))
    out["replicas"] = catch(lambda: lep.LargeEPMoE(make_config(2, top_k=1, replace_every=2), placement=replicas))
    layer = lep.LargeEPMoE(make_config(ws, replace_every=1))
    opt = torch.optim.Adam(layer.parameters())
    layer(torch.randn(4, layer.config.hidden_size)).sum().backward()
    opt.step()
    out["no_optimizer"] = catch(lambda: lep.rebalance(layer))
    # two data-parallel copies of an EP group of 2
    groups = build_process_groups(Placement.identity(2))
    copied = lep.LargeEPMoE(make_config(2, top_k=1, replace_every=1), expert_groups=groups)
    out["copies"] = catch(lambda: lep.rebalance(copied, torch.optim.Adam(copied.parameters())))
    return out


def test_refusals() -> None:
    with pytest.raises(NotImplementedError, match="replace_every=2 with num_groups=2"):
        make_config(4, num_groups=2, group_topk=1, replace_every=2)
    with pytest.raises(ValueError, match="replace_every=-1"):
        make_config(4, replace_every=-1)
    out = world(_refusals, 4)[0]
    assert "static replicas (experts [0, 1] on several ranks)" in out["replicas"], out
    assert "call largeep_plugin.rebalance(model, optimizer)" in out["no_optimizer"], out
    assert "needs rebalance(model, optimizer, dp_group=...)" in out["copies"], out
