"""LargeEPMoE with expert tensor parallelism: a placement with ``expert_tp_degree`` t > 1 splits each copy of an
expert over t consecutive ranks (shard j: F/t rows of fc1, the same columns of fc2, fc2's bias on shard 0 only).

Checked against the dense reference on 4 gloo ranks, one world: output, input gradient, router gradient, and each
shard's gradients against the matching slice of the reference expert's (summed over replicas and ranks), for
GELU and SwiGLU, top-1 and top-2, with biases, capacity drops, chunked overlap, node-batched dispatch over 2 nodes
and replicated TP copies. Single process: the shards are slices of the seeded expert, and bad shard arguments
are errors naming the value.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from conftest import HIDDEN, global_batch, make_config, rank_slice, rel_err, router_grad_error, world
from largeep_plugin.layer.experts import ExpertMLP
from largeep_plugin.layer.grads import allreduce_gradients
from largeep_plugin.layer.moe_layer import LargeEPMoE
from largeep_plugin.placement.plan import Placement
from largeep_plugin.layer.reference import DenseMoEReference
from largeep_plugin.placement.topology import Topology


def _tp_placement(rank_to_expert: tuple[int, ...], num_experts: int, t: int, nodes: int = 1) -> Placement:
    topo = Topology.uniform(nodes, len(rank_to_expert) // nodes)
    return Placement(topology=topo, num_experts=num_experts, rank_to_experts=tuple((e,) for e in rank_to_expert),
                     expert_tp_degree=t)


def _slice_of(expert: ExpertMLP, name: str, full: torch.Tensor) -> torch.Tensor:
    """The part of the whole expert's tensor ``name`` that shard ``expert`` holds."""
    rows = expert.ffn_rows()
    if name.startswith("fc1."):
        return full[rows]
    if name == "fc2.weight":
        return full[:, rows[: expert.config.ffn_hidden_size // expert.tp_size]]
    return full  # fc2.bias, on shard 0 only


def _tp_parity(placement: Placement, counts: list[int], seed: int, **overrides) -> dict[str, float]:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    cfg = make_config(placement.num_experts, **overrides)
    layer = LargeEPMoE(cfg, placement=placement)
    ref = DenseMoEReference(cfg)
    x_GH, g_GH = global_batch(counts, HIDDEN, seed)
    own = rank_slice(counts, rank)

    x = x_GH[own].clone().requires_grad_(True)
    y = layer(x)
    (y * g_GH[own]).sum().backward()
    allreduce_gradients(layer, average=False)  # router over all ranks; each shard over its copies

    x_ref = x_GH.clone().requires_grad_(True)
    y_ref = torch.cat([ref(x_ref[rank_slice(counts, r)]) for r in range(world_size)])
    (y_ref * g_GH).sum().backward()

    errors = {"y": rel_err(y.detach(), y_ref.detach()[own]), "dx": rel_err(x.grad, x_ref.grad[own])}
    errors["router"] = router_grad_error(cfg, layer.router.weight.grad, ref.router.weight.grad)
    expert = layer.expert
    want = dict(ref.experts[layer.expert_id].named_parameters())
    for name, p in expert.named_parameters():
        errors[f"{name}.init"] = float((p.detach() - _slice_of(expert, name, want[name].detach())).abs().max())
        errors[f"{name}.grad"] = rel_err(p.grad, _slice_of(expert, name, want[name].grad))
    errors["shard"] = expert.tp_rank
    errors["has_fc2_bias"] = float(expert.fc2.bias is not None)
    errors["dropped"] = float(layer.last_stats.dropped)
    errors["ref_scale"] = float(min(y_ref.abs().max(), x_ref.grad.abs().max()))
    with torch.no_grad():
        errors["y_no_grad"] = rel_err(layer(x_GH[own]), y_ref.detach()[own])
    return errors


def _four_ranks(rank: int, world_size: int) -> dict[str, dict[str, float]]:
    two_by_two = _tp_placement((0, 0, 1, 1), 2, t=2)             # 2 experts, each over 2 ranks
    across_nodes = _tp_placement((0, 0, 1, 1), 2, t=2, nodes=2)  # one expert per node
    replicated = _tp_placement((0, 0, 0, 0), 1, t=2)             # 1 expert: 2 copies of 2 shards
    four_way = _tp_placement((0, 0, 0, 0), 1, t=4)               # 1 expert over 4 ranks
    return {
        "gelu-top1": _tp_parity(two_by_two, [9, 14, 11, 6], seed=1, top_k=1),
        "swiglu-top2-bias": _tp_parity(two_by_two, [12, 7, 10, 13], seed=2, top_k=2, activation="swiglu",
                                       linear_bias=True),
        "gelu-top2-capacity-chunks3": _tp_parity(two_by_two, [24, 24, 24, 24], seed=3, top_k=2, capacity_factor=0.5,
                                                 overlap_chunks=3),
        "swiglu-top1-hierarchical": _tp_parity(across_nodes, [11, 0, 15, 8], seed=4, top_k=1, activation="swiglu",
                                               dispatch="hierarchical"),
        "gelu-top1-replicated-bias": _tp_parity(replicated, [10, 12, 9, 14], seed=5, top_k=1, linear_bias=True),
        "swiglu-top1-four-way-chunks2": _tp_parity(four_way, [8, 9, 10, 11], seed=6, top_k=1, activation="swiglu",
                                                   overlap_chunks=2),
    }


def test_expert_tensor_parallel_layer_matches_dense_reference() -> None:
    results = world(_four_ranks, 4)
    bad = {}
    for rank, cases in enumerate(results):
        for case, errs in cases.items():
            assert errs["ref_scale"] > 1e-3, (case, errs)
            for key, value in errs.items():
                if key in ("shard", "has_fc2_bias", "dropped", "ref_scale"):
                    continue
                if not (value == 0.0 if key.endswith(".init") else value <= 1e-5):
                    bad.setdefault(f"rank{rank}:{case}", {})[key] = value
    assert not bad, f"expert-TP layer differs from the dense reference: {bad}"
    # Shards as placed: ranks 0,1 / 2,3 are shards 0,1 of their copy (four-way: 0..3); fc2's bias on shard 0 only.
    assert [r["gelu-top1"]["shard"] for r in results] == [0, 1, 0, 1]
    assert [r["swiglu-top1-four-way-chunks2"]["shard"] for r in results] == [0, 1, 2, 3]
    assert [r["swiglu-top2-bias"]["has_fc2_bias"] for r in results] == [1.0, 0.0, 1.0, 0.0]
    assert results[0]["gelu-top2-capacity-chunks3"]["dropped"] > 0


def test_shards_are_slices_of_the_seeded_expert_and_add_up_to_it() -> None:
    cfg = make_config(4, activation="swiglu", linear_bias=True).expert_config
    whole = ExpertMLP(cfg, expert_id=3, init_seed=5)
    with torch.no_grad():
        whole.fc2.bias.normal_()  # a nonzero bias: it must be added exactly once
    shards = [ExpertMLP(cfg, expert_id=3, init_seed=5, tp_rank=j, tp_size=4) for j in range(4)]
    shards[0].fc2.bias.data.copy_(whole.fc2.bias.data)
    x = torch.randn(7, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    assert rel_err(sum(s(x) for s in shards), whole(x)) < 1e-6
    f = cfg.ffn_hidden_size
    assert shards[1].fc1.weight.shape == (2 * f // 4, cfg.hidden_size) and shards[1].fc2.weight.shape == (cfg.hidden_size, f // 4)
    assert torch.equal(shards[1].fc1.weight, whole.fc1.weight[shards[1].ffn_rows()])


@pytest.mark.parametrize("kwargs, words", [
    (dict(tp_rank=2, tp_size=2), r"tp_rank=2 must be in \[0, 2\)"),
    (dict(tp_rank=0, tp_size=0), r"tp_size=0 must be an integer >= 1"),
    (dict(tp_rank=0, tp_size=3), r"ffn_hidden_size=\d+ is not divisible by the expert-TP size 3"),
])
def test_bad_shard_arguments_name_the_value(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        ExpertMLP(make_config(2).expert_config, expert_id=0, **kwargs)


def test_node_batched_dispatch_crosses_to_a_tp_group_once_per_token() -> None:
    from largeep_plugin.layer.hierarchical import NodeLayout, internode_rows

    # Rank 0 (node 0) sends 3 tokens, top-1, to the expert held by ranks 2 and 3 (node 1) as two TP shards: the
    # layer expands each (token, k) to both shards. Flat: 6 rows cross nodes; node-batched: 3.
    first_T1 = torch.full((3, 1), 2)
    dest_TK = (first_T1.unsqueeze(-1) + torch.arange(2)).flatten(1)
    keep_TK = torch.ones_like(dest_TK, dtype=torch.bool)
    assert internode_rows(dest_TK, keep_TK, 0, NodeLayout(num_ranks=4, ranks_per_node=2)) == (6, 3)
