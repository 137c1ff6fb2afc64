"""Dynamic replicas (``LargeEPConfig(dynamic_replicas=S)``) on gloo ranks against the dense reference.

Every case trains a few SGD steps under a selection bias that makes two experts hot and then moves the heat to two
others, so the plan is made, used, and changed between steps (``rebalance_decay=0``: it follows at once). Each
step compares the output, the input gradient, the router gradient and every home expert's gradient with the dense
reference, then the weights after the step; ``largeep_plugin.rebalance`` follows every optimizer step. The clones
must really compute rows and return gradients (a dropped or doubled clone gradient breaks the expert gradients;
a clone that misses a refresh breaks the outputs: both are shown to be caught below).

Routing is checked row by row: every row a rank's slots receive is an exact copy of one token of its source rank
(rows carry their (source, token) tag), the slot holds the expert that token chose, and each source splits its
assignments of an expert between the copies as the plan's shares say, to one row.
"""
from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist

from conftest import HIDDEN, expert_grads, global_batch, make_config, rank_slice, rel_err, world
import largeep_plugin as lep
from largeep_plugin.layer import clones as clones_mod
from largeep_plugin.layer.experts import SlotExperts
from largeep_plugin.layer.grads import allreduce_gradients
from largeep_plugin.layer.reference import DenseMoEReference
from largeep_plugin.placement.plan import Placement
from largeep_plugin.placement.topology import Topology

T = 16
LR = 0.05
TOL = 1e-5


def _bias(num_experts: int, step: int, heat: tuple[tuple[int, int], tuple[int, int]]) -> torch.Tensor:
    """Two hot experts for the first two steps, two others after."""
    bias = torch.zeros(num_experts)
    a, b = heat[0] if step < 2 else heat[1]
    bias[a], bias[b] = 3.0, 2.0
    return bias


def _placement(setup: dict[str, Any], world_size: int) -> Placement | None:
    topo = Topology.uniform(2, world_size // 2)
    if setup.get("colocated"):  # 2 experts per rank
        return Placement(topology=topo, num_experts=2 * world_size,
                         rank_to_experts=tuple((2 * r, 2 * r + 1) for r in range(world_size)))
    if setup.get("replicated"):  # static replicas: expert e on ranks e and e + R/2
        half = world_size // 2
        return Placement(topology=topo, num_experts=half, rank_to_experts=tuple((r % half,) for r in range(world_size)))
    return None


class _Spy:
    """Rows each slot received (per source) and the norms of the gradients clones returned, in this rank."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, list[list[int]]]] = []
        self.returned: list[float] = []

    def __enter__(self) -> "_Spy":
        self._call, self._ret = SlotExperts.__call__, clones_mod.CloneSlots.return_gradients
        spy = self

        def call(experts: SlotExperts, rows_MH: torch.Tensor, counts: Any, dev: Any = None) -> torch.Tensor:
            spy.calls.append((rows_MH.detach().clone(), [list(c) for c in counts]))
            return spy._call(experts, rows_MH, counts, dev)

        def ret(slots: Any, plan: Any, grad_SP: Any, num_params: int) -> list:
            out = spy._ret(slots, plan, grad_SP, num_params)
            spy.returned.append(sum(float(g.abs().sum()) for g in out if g is not None))
            return out

        SlotExperts.__call__, clones_mod.CloneSlots.return_gradients = call, ret  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        SlotExperts.__call__, clones_mod.CloneSlots.return_gradients = self._call, self._ret  # type: ignore[method-assign]


def _train_case(rank: int, world_size: int, overrides: dict[str, Any], setup: dict[str, Any],
                steps: int = 5) -> dict[str, Any]:
    warnings.simplefilter("ignore")  # the colocation warning
    placement = _placement(setup, world_size)
    e = placement.num_experts if placement is not None else world_size
    cfg = make_config(e, **{"top_k": 2, "rebalance_decay": 0.0, **overrides})
    layer = lep.LargeEPMoE(cfg, placement=placement, ranks_per_node=setup.get("ranks_per_node"))
    ref = DenseMoEReference(cfg)
    opt, ref_opt = torch.optim.SGD(layer.parameters(), lr=LR), torch.optim.SGD(ref.parameters(), lr=LR)
    counts = [T] * world_size
    own = rank_slice(counts, rank)
    out: dict[str, Any] = {"errors": [], "clone_rows": [], "returned": [], "rank_imbalance": [], "changed": [],
                           "clones": []}
    for step in range(steps):
        bias = _bias(e, step, setup.get("heat", ((0, 1), (2, 3))))
        layer.router.expert_bias.copy_(bias)
        ref.router.expert_bias.copy_(bias)
        x_GH, g_GH = global_batch(counts, HIDDEN, seed=10 + step)
        x = x_GH[own].clone().requires_grad_(True)
        with _Spy() as spy:
            y = layer(x)
            (y * g_GH[own]).sum().backward()
        allreduce_gradients(layer, average=False)  # the gradient of the summed loss, as the reference computes it
        x_ref = x_GH.clone().requires_grad_(True)
        y_ref = ref(x_ref)
        (y_ref * g_GH).sum().backward()
        errs = {"y": rel_err(y.detach(), y_ref.detach()[own]), "dx": rel_err(x.grad, x_ref.grad[own]),
                "router": rel_err(layer.router.weight.grad, ref.router.weight.grad)}
        for x_id, module in layer.local_experts():
            want = expert_grads(ref.experts[x_id])
            for name, got in expert_grads(module).items():
                errs[f"expert{x_id}.{name}.grad"] = rel_err(got, want[name])
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        for x_id, module in layer.local_experts():
            want = dict(ref.experts[x_id].named_parameters())
            for name, p in module.named_parameters():
                errs[f"expert{x_id}.{name}.weight"] = rel_err(p, want[name])
        out["errors"].append(errs)
        lh = layer.clones.plan.num_home_slots
        out["clone_rows"].append(sum(c for _, counts_RL in spy.calls for per in counts_RL for c in per[lh:]))
        out["returned"].append(sum(spy.returned))
        out["rank_imbalance"].append(layer.last_stats.rank_imbalance)
        records = lep.rebalance(layer)
        out["changed"].append(any(r["changed"] for r in records))
        out["clones"].append(layer.clones.plan.clones)
    return out


CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "flat S=1": ({"dynamic_replicas": 1}, {}),
    "flat S=2 swiglu": ({"dynamic_replicas": 2, "activation": "swiglu"}, {}),
    "chunked": ({"dynamic_replicas": 1, "overlap_chunks": 3}, {}),
    "hierarchical S=2": ({"dynamic_replicas": 2, "dispatch": "hierarchical"}, {"ranks_per_node": 2}),
    "hierarchical+chunked": ({"dynamic_replicas": 1, "dispatch": "hierarchical", "overlap_chunks": 2},
                             {"ranks_per_node": 2}),
    "colocated": ({"dynamic_replicas": 1}, {"colocated": True}),
    "static replicas": ({"dynamic_replicas": 1, "top_k": 1, "normalize_topk": False}, {"replicated": True, "heat": ((0, 1), (1, 0))}),
    "DeepSeek shape (groups, sigmoid, shared expert, bias)": (
        {"dynamic_replicas": 1, "num_groups": 2, "group_topk": 1, "score_function": "sigmoid",
         "routed_scaling_factor": 2.5, "shared_ffn_hidden_size": 8, "linear_bias": True}, {}),
}


def _cases_rank(rank: int, world_size: int, names: list[str]) -> dict[str, Any]:
    out = {}
    for name in names:
        overrides, setup = CASES[name]
        out[name] = _train_case(rank, world_size, overrides, setup)
    return out


def _check(per_rank: list[dict[str, Any]]) -> None:
    for name in per_rank[0]:
        for r, res in enumerate(per_rank):
            for step, errs in enumerate(res[name]["errors"]):
                bad = {k: v for k, v in errs.items() if not v <= TOL}
                assert not bad, f"{name}, rank {r}, step {step}: differs from the dense reference: {bad}"
        first = per_rank[0][name]
        # The plan is made after step 0, used from step 1, and changes when the heat moves.
        assert first["changed"][0] and any(first["changed"][2:]), (name, first["changed"], first["clones"])
        rows = [sum(res[name]["clone_rows"][s] for res in per_rank) for s in range(len(first["clone_rows"]))]
        returned = [sum(res[name]["returned"][s] for res in per_rank) for s in range(len(rows))]
        # Steps 1, 3 and 4 run on a plan made for their heat (step 2 on one made for the old heat).
        assert rows[0] == 0 and all(rows[s] > 0 for s in (1, 3, 4)), (name, "clones computed no rows", rows)
        assert returned[0] == 0 and all(returned[s] > 0 for s in (1, 3, 4)), (name, "no clone gradient", returned)
        # Balance: with the clones in place (the step after a plan that matches the heat) the busiest rank is
        # lighter than without them (step 0: no clones yet).
        imb = first["rank_imbalance"]
        assert imb[1] < imb[0] and imb[4] < imb[0], (name, imb)


@pytest.mark.parametrize("names", [list(CASES)[:4], list(CASES)[4:]], ids=["paths", "layouts"])
def test_dynamic_replicas_match_the_reference_at_ep4(names: list[str]) -> None:
    _check(world(_cases_rank, 4, names, timeout=300.0))


def test_dynamic_replicas_match_the_reference_at_ep8() -> None:
    def rank_fn(rank: int, world_size: int) -> dict[str, Any]:
        return {
            "flat S=1": _train_case(rank, world_size, {"dynamic_replicas": 1}, {}),
            "hierarchical+chunked S=2": _train_case(
                rank, world_size, {"dynamic_replicas": 2, "dispatch": "hierarchical", "overlap_chunks": 2},
                {"ranks_per_node": 4}),
        }
    _check(world(rank_fn, 8, timeout=400.0))


# ---- routing, row by row ---------------------------------------------------------------------------------------

def _routing_rank(rank: int, world_size: int, ranks_per_node: int | None) -> dict[str, Any]:
    cfg = make_config(world_size, top_k=2, dynamic_replicas=2, rebalance_decay=0.0)
    layer = lep.LargeEPMoE(cfg, ranks_per_node=ranks_per_node)
    bias = torch.zeros(world_size)
    bias[0] = 3.0  # expert 0 in every token's top 2: cloned, its tokens split by fractional shares
    layer.router.expert_bias.copy_(bias)
    counts = [24 + 4 * r for r in range(world_size)]
    x_GH, _ = global_batch(counts, HIDDEN, seed=5)
    x_GH[:, 0] = torch.arange(x_GH.shape[0], dtype=torch.float32)  # the row tag: the token's global index
    own = rank_slice(counts, rank)
    layer(x_GH[own]).sum().backward()
    lep.rebalance(layer)  # plan from that load, clones refreshed
    with _Spy() as spy:
        layer(x_GH[own])
    rows_MH, counts_RL = spy.calls[0]
    ref = DenseMoEReference(cfg)
    ref.router.expert_bias.copy_(bias)
    ids_GK = ref.router(x_GH).topk_ids_TK  # every token's experts
    plan = layer.clones.plan
    lh = plan.num_home_slots
    held = [layer.expert_ids[0]] * lh + list(plan.clones[rank])  # the expert of each of this rank's slots
    problems: list[str] = []
    got: dict[tuple[int, int, int], int] = {}  # (source, expert, slot) -> rows
    start = 0
    for src, per_slot in enumerate(counts_RL):
        for slot, n in enumerate(per_slot):
            for row in rows_MH[start:start + n]:
                token = int(row[0])
                if not rank_slice(counts, src).start <= token < rank_slice(counts, src).stop:
                    problems.append(f"row of token {token} in the block of source {src}")
                elif not torch.equal(row, x_GH[token]):
                    problems.append(f"token {token} arrived changed")
                elif held[slot] not in ids_GK[token].tolist():
                    problems.append(f"token {token} (experts {ids_GK[token].tolist()}) in slot {slot} of expert {held[slot]}")
                got[(src, held[slot], slot)] = got.get((src, held[slot], slot), 0) + 1
            start += n
    return {"problems": problems, "got": got, "plan": plan, "ids": ids_GK, "counts": counts}


@pytest.mark.parametrize("ranks_per_node", [None, 2], ids=["one node", "two nodes"])
def test_rows_reach_the_copies_the_plan_says(ranks_per_node: int | None) -> None:
    results = world(_routing_rank, 4, ranks_per_node)
    for r, res in enumerate(results):
        assert not res["problems"], f"rank {r}: {res['problems'][:5]}"
    plan, ids_GK, counts = results[0]["plan"], results[0]["ids"], results[0]["counts"]
    cum, _, _ = plan.route_tables()
    # Not a trivial split: some source sends expert 0 to more than one copy.
    assert plan.num_clones > 0 and any(0.0 < float(c) < 1.0 for c in cum[:, 0].flatten()), (plan.clones, cum[:, 0])
    got: dict[tuple[int, int, int, int], int] = {}
    for dest, res in enumerate(results):
        for (src, x, slot), n in res["got"].items():
            got[(src, x, dest, slot)] = n
    # Each source splits its n assignments of expert x between the copies as the shares say, to one row.
    for src in range(4):
        node = plan.topology.node_of(src)
        ids = ids_GK[rank_slice(counts, src)]
        for x in range(plan.num_experts):
            n = int((ids == x).sum())
            prev = 0.0
            for j, (dest, slot) in enumerate(plan.copies(x)):
                want = (float(cum[node, x, j]) - prev) * n
                prev = float(cum[node, x, j])
                assert abs(got.get((src, x, dest, slot), 0) - want) <= 1.0, (src, x, dest, slot, got.get((src, x, dest, slot)), want)


# ---- refreshes, checkpoints, bad settings -----------------------------------------------------------------------

def _refresh_rank(rank: int, world_size: int) -> dict[str, Any]:
    cfg = make_config(world_size, top_k=2, dynamic_replicas=1, rebalance_decay=0.0)
    layer = lep.LargeEPMoE(cfg)
    bias = torch.zeros(world_size)
    bias[0], bias[1] = 3.0, 2.0
    layer.router.expert_bias.copy_(bias)
    counts = [T] * world_size
    x_GH, _ = global_batch(counts, HIDDEN, seed=1)
    own = rank_slice(counts, rank)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    out: dict[str, Any] = {}
    layer(x_GH[own]).square().sum().backward()
    lep.rebalance(layer)                      # clones of the hot experts in place
    assert layer.clones.plan.num_clones > 0
    opt.step()                                # ... and a step without rebalance: the clones are stale
    try:
        layer(x_GH[own])
        out["stale"] = "no error"
    except ValueError as err:
        out["stale"] = str(err)
    lep.refresh_clones(layer)
    out["after_refresh"] = rel_err(layer(x_GH[own]).detach(), _reference_output(layer, cfg, x_GH, counts)[own])

    # A refresh that never happens, with the version check fooled (weights written through .data): the clones
    # compute with the old weights and the output is wrong. This is what the parity tests above would catch.
    with torch.no_grad():
        for p in layer.local_experts()[0][1].parameters():
            p.data.mul_(1.5)
    out["missed_refresh"] = rel_err(layer(x_GH[own]).detach(), _reference_output(layer, cfg, x_GH, counts)[own])
    lep.refresh_clones(layer)

    # A checkpoint holds the homes, the load history and the plan; a new layer that loads it routes the same way
    # (its first forward refreshes the clones) and gives the same output bit for bit.
    state = layer.state_dict()
    out["keys"] = sorted(k for k in state if k.startswith("clones."))
    fresh = lep.LargeEPMoE(cfg)
    fresh.load_state_dict(state)
    out["same_plan"] = fresh.clones.plan.to_dict() == layer.clones.plan.to_dict()
    out["bitwise"] = torch.equal(fresh(x_GH[own]), layer(x_GH[own]))
    out["ema"] = torch.equal(fresh.clones.load_ema_E, layer.clones.load_ema_E)
    return out


def _reference_output(layer: lep.LargeEPMoE, cfg: Any, x_GH: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The dense reference with the layer's current weights (every rank's experts gathered)."""
    ref = DenseMoEReference(cfg)
    ref.router.weight.data.copy_(layer.router.weight.detach())
    ref.router.expert_bias.copy_(layer.router.expert_bias)
    mine = torch.cat([p.detach().reshape(-1) for p in layer.expert.parameters()])
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    for e, flat in enumerate(every):
        start = 0
        for p in ref.experts[e].parameters():
            p.data.copy_(flat[start:start + p.numel()].view_as(p))
            start += p.numel()
    with torch.no_grad():
        return ref(x_GH)


def test_stale_clones_are_an_error_and_checkpoints_round_trip() -> None:
    results = world(_refresh_rank, 4)
    for r, res in enumerate(results):
        assert "rebalance(model) after every optimizer step" in res["stale"], (r, res["stale"])
        assert res["after_refresh"] <= TOL, (r, res["after_refresh"])
        assert res["keys"] == ["clones.load_ema_E", "clones.plan_clones_RS", "clones.plan_load_E"], res["keys"]
        assert res["same_plan"] and res["bitwise"] and res["ema"], (r, res)
    # Some rank routes tokens to a clone of the changed expert, so the missed refresh shows in its output.
    assert max(res["missed_refresh"] for res in results) > 1e-3, [res["missed_refresh"] for res in results]


def test_bad_settings_name_the_field() -> None:
    with pytest.raises(ValueError, match="dynamic_replicas=-1"):
        make_config(4, dynamic_replicas=-1)
    with pytest.raises(ValueError, match="rebalance_every=0"):
        make_config(4, dynamic_replicas=1, rebalance_every=0)
    with pytest.raises(ValueError, match="rebalance_decay=1.5"):
        make_config(4, dynamic_replicas=1, rebalance_decay=1.5)
    tp = Placement(topology=Topology.uniform(1, 2), num_experts=1, rank_to_experts=((0,), (0,)), expert_tp_degree=2)

    def rank_fn(rank: int, world_size: int) -> str:
        try:
            lep.LargeEPMoE(make_config(1, top_k=1, dynamic_replicas=1), placement=tp)
            out = "no error"
        except ValueError as err:
            out = str(err)
        dist.barrier()  # no rank leaves before every rank has joined the world
        return out

    for msg in world(rank_fn, 2):
        assert "dynamic_replicas=1 with expert tensor parallelism" in msg, msg
