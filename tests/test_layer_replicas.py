"""LargeEPMoE with a Placement: replicas of hot experts on spare GPUs (8 ranks, 4 experts, skewed load).

Checked in one world: the output and every gradient equal the dense reference (replica gradients summed over the
replica group by ``grads.allreduce_gradients``), the hot experts' tokens really are spread over their replicas,
and the replicas hold identical weights after optimizer steps.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from conftest import HIDDEN, expert_grads, global_batch, make_config, rank_slice, rel_err, world
from largeep_plugin.layer.grads import allreduce_gradients
from largeep_plugin.layer.moe_layer import LargeEPMoE
from largeep_plugin.placement.plan import plan_placement
from largeep_plugin.layer.reference import DenseMoEReference
from largeep_plugin.placement.topology import Topology

E, WORLD, T = 4, 8, 24
SKEWED_LOAD = [64, 24, 8, 4]
BIAS = torch.tensor([2.0, 0.8, 0.0, 0.0])  # selection bias: skews the real routing like SKEWED_LOAD


def _replica_world(rank: int, world_size: int) -> dict:
    cfg = make_config(E, top_k=2)
    placement = plan_placement(E, Topology.uniform(2, 4), load=SKEWED_LOAD, top_k=2)
    layer = LargeEPMoE(cfg, placement=placement)
    ref = DenseMoEReference(cfg)
    for m in (layer, ref):
        m.router.expert_bias.copy_(BIAS)

    counts = [T] * world_size
    x_GH, g_GH = global_batch(counts, HIDDEN, seed=3)
    own = rank_slice(counts, rank)
    received = []
    layer.expert.register_forward_hook(lambda mod, inp, out: received.append(inp[0].shape[0]))

    x = x_GH[own].clone().requires_grad_(True)
    (layer(x) * g_GH[own]).sum().backward()
    y = layer(x_GH[own]).detach()
    allreduce_gradients(layer, average=False)  # the gradient of the summed loss, as the reference computes it

    x_ref = x_GH.clone().requires_grad_(True)
    y_ref = ref(x_ref)
    (y_ref * g_GH).sum().backward()
    errors = {
        "y": rel_err(y, y_ref.detach()[own]),
        "dx": rel_err(x.grad, x_ref.grad[own]),
        "router": rel_err(layer.router.weight.grad, ref.router.weight.grad),
    }
    want = expert_grads(ref.experts[layer.expert_id])
    for name, got in expert_grads(layer.expert).items():
        errors[f"expert.{name}"] = rel_err(got, want[name])

    # A few SGD steps with data-parallel averaging: replicas must stay bit-identical.
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    start = layer.expert.fc1.weight.detach().clone()
    for step in range(3):
        opt.zero_grad()
        xs = torch.randn(T, HIDDEN, generator=torch.Generator().manual_seed(100 * step + rank))
        layer(xs).square().sum().backward()
        allreduce_gradients(layer)
        opt.step()
    weights = torch.cat([p.detach().reshape(-1) for p in layer.expert.parameters()])
    gathered = [torch.empty_like(weights) for _ in range(world_size)]
    dist.all_gather(gathered, weights)
    same_as_replicas = all(
        torch.equal(gathered[r], weights) for r, e in enumerate(placement.rank_to_expert) if e == layer.expert_id
    )
    return {
        "errors": errors,
        "expert": layer.expert_id,
        "rows_first_forward": received[0],
        "replicas_identical": same_as_replicas,
        "moved": float((layer.expert.fc1.weight.detach() - start).abs().max()),
        "rank_to_expert": placement.rank_to_expert,
    }


def test_replicated_layer_matches_reference_and_replicas_stay_identical() -> None:
    results = world(_replica_world, WORLD)
    rank_to_expert = results[0]["rank_to_expert"]
    replicas = [rank_to_expert.count(e) for e in range(E)]
    # The plan really replicates: every expert placed, the hottest one on more GPUs than the coldest.
    assert sorted(set(rank_to_expert)) == list(range(E)), rank_to_expert
    assert replicas[0] > replicas[3], replicas

    for r, res in enumerate(results):
        bad = {k: v for k, v in res["errors"].items() if not v <= 1e-5}
        assert not bad, f"rank {r} (expert {res['expert']}) differs from the dense reference: {bad}"
        assert res["replicas_identical"], f"rank {r}: replicas of expert {res['expert']} diverged after SGD steps"
        assert res["moved"] > 0, f"rank {r}: the expert did not train"
    # Each replica of the hottest expert computes a share of its tokens (the load is spread, not piled on one).
    hot_rows = [res["rows_first_forward"] for res in results if res["expert"] == 0]
    assert len(hot_rows) >= 2 and min(hot_rows) > 0, hot_rows
