"""LargeEPMoE with colocated experts: more experts than ranks, several experts per rank (opt-in).

Checked against the dense reference on 2 and 4 gloo ranks, one world each, many cases per world: the output, the
input gradient, the router gradient, every local expert's gradients (expert e on its rank vs the reference's
expert e), and that each expert received exactly the rows routed to it. Placements: the planner's (with
``allow_colocate=True``), uneven hand-made ones (3 + 1 experts, a rank with one expert among ranks with several),
and colocated + replicated experts (gradients summed over the replica group), each also through the chunked overlap
pipeline, and through the node-batched (hierarchical) dispatch on 2 nodes x 2 ranks, with and without node/rail
groups and chunks. Single process: the warning is emitted once, the single-expert views raise NotImplementedError.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

from conftest import HIDDEN, global_batch, make_config, rank_slice, rel_err, router_grad_error, world
from largeep_plugin.layer.experts import LocalExperts
from largeep_plugin.layer.grads import allreduce_gradients
from largeep_plugin.layer.moe_layer import LargeEPMoE
from largeep_plugin.placement.plan import Placement, plan_placement
from largeep_plugin.layer.process_groups import build_node_groups
from largeep_plugin.layer.reference import DenseMoEReference
from largeep_plugin.placement.topology import Topology


def _placement(rank_to_experts: tuple[tuple[int, ...], ...], num_experts: int, nodes: int = 1) -> Placement:
    topo = Topology.uniform(nodes, len(rank_to_experts) // nodes)
    return Placement(topology=topo, num_experts=num_experts, rank_to_experts=rank_to_experts)


def _planned(num_experts: int, num_ranks: int, load: list[int] | None = None) -> Placement:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the planner's own colocation warning
        return plan_placement(num_experts, Topology.uniform(1, num_ranks), load=load, allow_colocate=True)


def _colocated_parity(placement: Placement, counts: list[int], seed: int, node_groups=None, **overrides) -> dict[str, float]:
    """One case inside a rank: errors of the colocated layer against the dense reference (this rank's experts).

    Loss = sum(y * g) summed over ranks; the reference runs each rank's tokens as a separate call (capacity is
    decided per rank). Expert and router gradients are summed over ranks / replica groups with
    ``allreduce_gradients(average=False)``.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    cfg = make_config(placement.num_experts, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = LargeEPMoE(cfg, placement=placement, node_groups=node_groups)
    ref = DenseMoEReference(cfg)
    x_GH, g_GH = global_batch(counts, HIDDEN, seed)
    own = rank_slice(counts, rank)

    received: dict[int, int] = {}
    def count_rows(e: int):
        def hook(module, inputs, output) -> None:
            received[e] = received.get(e, 0) + inputs[0].shape[0]  # summed over chunks; removed after one forward
        return hook

    hooks = [mod.register_forward_hook(count_rows(e)) for e, mod in layer.local_experts()]
    x = x_GH[own].clone().requires_grad_(True)
    y = layer(x)
    (y * g_GH[own]).sum().backward()
    for h in hooks:
        h.remove()
    allreduce_gradients(layer, average=False)

    x_ref = x_GH.clone().requires_grad_(True)
    y_ref = torch.cat([ref(x_ref[rank_slice(counts, r)]) for r in range(world_size)])
    (y_ref * g_GH).sum().backward()

    errors = {"y": rel_err(y.detach(), y_ref.detach()[own]), "dx": rel_err(x.grad, x_ref.grad[own])}
    errors["router"] = router_grad_error(cfg, layer.router.weight.grad, ref.router.weight.grad)
    for e, mod in layer.local_experts():
        want = dict(ref.experts[e].named_parameters())
        for name, p in mod.named_parameters():
            errors[f"expert{e}.{name}.init"] = float((p.detach() - want[name].detach()).abs().max())
            errors[f"expert{e}.{name}.grad"] = rel_err(p.grad, want[name].grad)

    # Rows per expert: what the local experts received, summed over ranks (and replicas), equals the assignments
    # the reference kept for that expert.
    rows_E = torch.zeros(cfg.num_experts, dtype=torch.int64)
    for e, n in received.items():
        rows_E[e] += n
    dist.all_reduce(rows_E)
    want_E = torch.zeros(cfg.num_experts, dtype=torch.int64)
    with torch.no_grad():
        for r in range(world_size):
            routing = ref.router(x_GH[rank_slice(counts, r)])
            want_E += torch.bincount(routing.topk_ids_TK[routing.keep_TK], minlength=cfg.num_experts)
    errors["rows_per_expert"] = float((rows_E - want_E).abs().sum())
    errors["ref_scale"] = float(min(y_ref.abs().max(), x_ref.grad.abs().max()))
    errors["dropped"] = float(layer.last_stats.dropped)

    # Inference: no autograd graph, the same output.
    with torch.no_grad():
        errors["y_no_grad"] = rel_err(layer(x_GH[own]), y_ref.detach()[own])
    return errors


def _check(per_rank: list[dict[str, dict[str, float]]], tol: float = 1e-5) -> None:
    """Every rank's numbers within ``tol``, seeded init and rows per expert exact, reference values not vanishing."""
    bad = {}
    for case, errs in ((f"rank{r}:{c}", e) for r, cases in enumerate(per_rank) for c, e in cases.items()):
        for k, v in errs.items():
            exact = k.endswith(".init") or k == "rows_per_expert"
            if k in ("ref_scale", "dropped"):
                continue
            if not (v == 0.0 if exact else v <= tol):
                bad.setdefault(case, {})[k] = v
        assert errs["ref_scale"] > 1e-3, (case, errs["ref_scale"])
    assert not bad, f"colocated layer differs from the dense reference: {bad}"


# ---- 2 ranks, 4 experts --------------------------------------------------------------------------------------------
def _two_ranks(rank: int, world_size: int) -> dict:
    planned = _planned(4, 2)
    uneven = _placement(((0, 1, 2), (3,)), 4)
    cases = {
        "planned-gelu-top2": _colocated_parity(planned, [20, 13], seed=1, top_k=2),
        "planned-swiglu-top1": _colocated_parity(planned, [17, 17], seed=2, top_k=1, activation="swiglu"),
        "uneven-swiglu-top2": _colocated_parity(uneven, [24, 9], seed=3, top_k=2, activation="swiglu"),
        "uneven-gelu-top1-sigmoid": _colocated_parity(uneven, [15, 21], seed=4, top_k=1, score_function="sigmoid"),
        "uneven-gelu-top2-capacity": _colocated_parity(uneven, [32, 32], seed=5, top_k=2, capacity_factor=0.75),
        "empty-rank": _colocated_parity(uneven, [19, 0], seed=6, top_k=2),
        # The overlap pipeline: counts per (chunk, rank, slot) in its one count exchange.
        "planned-gelu-top2-chunks3": _colocated_parity(planned, [20, 13], seed=7, top_k=2, overlap_chunks=3),
        "uneven-swiglu-top2-capacity-chunks2": _colocated_parity(uneven, [32, 32], seed=8, top_k=2, activation="swiglu",
                                                                 capacity_factor=0.75, overlap_chunks=2),
        "empty-rank-chunks4": _colocated_parity(uneven, [19, 0], seed=9, top_k=2, overlap_chunks=4),
    }
    # The single-expert views: a rank with one expert still has them, a rank with several raises.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = LargeEPMoE(make_config(4), placement=uneven)
    views = {"expert_ids": layer.expert_ids, "state_keys": sorted(k for k in layer.state_dict() if "experts" in k)}
    for attr in ("expert", "expert_id"):
        try:
            got = getattr(layer, attr)
            views[attr] = got if isinstance(got, int) else got.expert_id
        except NotImplementedError as err:
            views[attr] = f"NotImplementedError: {err}"
    return {"cases": cases, "views": views, "planned": planned.rank_to_experts}


def test_two_ranks_four_experts() -> None:
    results = world(_two_ranks, 2)
    planned = results[0]["planned"]
    assert max(len(h) for h in planned) == 2, planned  # the planner did colocate: the case is real
    _check([r["cases"] for r in results])
    assert results[0]["cases"]["uneven-gelu-top2-capacity"]["dropped"] > 0  # capacity really dropped some
    assert results[0]["cases"]["uneven-swiglu-top2-capacity-chunks2"]["dropped"] > 0
    assert results[0]["cases"]["planned-gelu-top2"]["dropped"] == 0
    v0, v1 = results[0]["views"], results[1]["views"]
    assert v0["expert_ids"] == (0, 1, 2) and v1["expert_ids"] == (3,)
    assert "NotImplementedError" in v0["expert"] and "(0, 1, 2)" in v0["expert"], v0
    assert "NotImplementedError" in v0["expert_id"], v0
    assert v1["expert"] == 3 and v1["expert_id"] == 3, v1
    assert len(v0["state_keys"]) == 6 and all(k.startswith("experts.") for k in v0["state_keys"]), v0
    assert v1["state_keys"] == ["experts.0.fc1.weight", "experts.0.fc2.weight"], v1


# ---- 4 ranks, 8 experts --------------------------------------------------------------------------------------------
def _four_ranks(rank: int, world_size: int) -> dict:
    planned = _planned(8, 4, load=[30, 1, 1, 1, 1, 1, 1, 1])
    uneven = _placement(((0, 1, 2), (3,), (4, 5), (6, 7)), 8)
    # Colocated and replicated: experts 0, 1, 2 each on two ranks, two experts on ranks 0 and 3.
    replicated = _placement(((0, 1), (2,), (0,), (1, 2)), 3)
    uneven_2x2 = _placement(((0, 1, 2), (3,), (4, 5), (6, 7)), 8, nodes=2)
    replicated_2x2 = _placement(((0, 1), (2,), (0,), (1, 2)), 3, nodes=2)
    groups = build_node_groups(list(range(world_size)), 2)
    return {
        "planned-swiglu-top2": _colocated_parity(planned, [12, 9, 16, 10], seed=11, top_k=2, activation="swiglu"),
        "planned-gelu-top1": _colocated_parity(planned, [11, 11, 11, 11], seed=12, top_k=1),
        "uneven-gelu-top2": _colocated_parity(uneven, [14, 7, 0, 18], seed=13, top_k=2),
        "uneven-swiglu-top2-capacity": _colocated_parity(uneven, [24, 24, 24, 24], seed=14, top_k=2,
                                                         activation="swiglu", capacity_factor=0.5),
        "replicated-gelu-top2": _colocated_parity(replicated, [16, 12, 9, 20], seed=15, top_k=2),
        "uneven-gelu-top2-chunks3": _colocated_parity(uneven, [14, 7, 0, 18], seed=16, top_k=2, overlap_chunks=3),
        "replicated-swiglu-top2-chunks2": _colocated_parity(replicated, [16, 12, 9, 20], seed=17, top_k=2,
                                                            activation="swiglu", overlap_chunks=2),
        # Node-batched dispatch over 2 nodes x 2 ranks: gateways forward copies sorted by (local rank, slot).
        "hier-uneven-gelu-top2": _colocated_parity(uneven_2x2, [14, 7, 0, 18], seed=18, top_k=2,
                                                   dispatch="hierarchical"),
        "hier-uneven-swiglu-top2-capacity-chunks3": _colocated_parity(
            uneven_2x2, [24, 24, 24, 24], seed=19, top_k=2, activation="swiglu", capacity_factor=0.5,
            dispatch="hierarchical", overlap_chunks=3),
        "hier-replicated-gelu-top2-chunks2": _colocated_parity(replicated_2x2, [16, 12, 9, 20], seed=20, top_k=2,
                                                               dispatch="hierarchical", overlap_chunks=2),
        "hier-groups-uneven-gelu-top1": _colocated_parity(uneven_2x2, [13, 11, 17, 9], seed=21, top_k=1,
                                                          dispatch="hierarchical", node_groups=groups),
        "hier-groups-uneven-gelu-top2-chunks2": _colocated_parity(uneven_2x2, [13, 11, 17, 9], seed=22, top_k=2,
                                                                  dispatch="hierarchical", overlap_chunks=2,
                                                                  node_groups=groups),
    }


def test_four_ranks_eight_experts_uneven_and_replicated() -> None:
    results = world(_four_ranks, 4)
    _check(results)
    assert results[0]["uneven-swiglu-top2-capacity"]["dropped"] > 0
    assert results[0]["hier-uneven-swiglu-top2-capacity-chunks3"]["dropped"] > 0


# ---- single process ----------------------------------------------------------------------------------------------
def test_one_rank_holding_every_expert_matches_reference_and_warns_once() -> None:
    # A placement no other test uses: the warning is once per placement and process.
    placement = _placement(((0, 1, 2, 3, 4),), 5)
    cfg = make_config(5, top_k=2, activation="swiglu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = [LargeEPMoE(cfg, placement=placement) for _ in range(3)]
        x = torch.randn(23, HIDDEN, generator=torch.Generator().manual_seed(7), requires_grad=True)
        y = layers[0](x)
        layers[1](x)
    colocation = [w for w in caught if "colocated" in str(w.message)]
    assert len(colocation) == 1, [str(w.message) for w in caught]
    assert "5 experts on 1 ranks" in str(colocation[0].message)

    ref = DenseMoEReference(cfg)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = ref(x_ref)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(8))
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    assert rel_err(y, y_ref) <= 1e-5 and rel_err(x.grad, x_ref.grad) <= 1e-5
    assert isinstance(layers[0].experts, LocalExperts) and layers[0].experts.expert_ids == (0, 1, 2, 3, 4)
    for e, mod in layers[0].local_experts():
        for name, p in mod.named_parameters():
            assert rel_err(p.grad, dict(ref.experts[e].named_parameters())[name].grad) <= 1e-5, (e, name)


def test_planner_refuses_colocation_without_opt_in_and_layer_needs_a_placement() -> None:
    with pytest.raises(ValueError, match="allow_colocate=True"):
        plan_placement(8, Topology.uniform(1, 4))
    with pytest.raises(ValueError, match="allow_colocate=True"):
        LargeEPMoE(make_config(3))  # 3 experts, 1 process, no placement


def test_local_experts_reject_counts_that_do_not_match_the_rows() -> None:
    experts = LocalExperts(make_config(4).expert_config, expert_ids=(1, 3))
    with pytest.raises(ValueError, match="recv_counts_RL"):
        experts(torch.zeros(5, HIDDEN), [[2, 2]])
    with pytest.raises(ValueError, match="distinct"):
        LocalExperts(make_config(4).expert_config, expert_ids=(1, 1))
