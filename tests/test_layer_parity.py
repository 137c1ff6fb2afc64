"""The sharded layer equals the dense reference, forward and backward, on gloo worlds of 2, 4, 8 and 16 ranks.

Compared in fp32 with a relative tolerance of 1e-5: the output, the input gradient, the router weight gradient
summed over ranks, and every gradient of each rank's expert (see ``conftest.parity_errors``). One world per EP
size runs the whole matrix of activation x score function x top_k.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from conftest import (
    HIDDEN, assert_parity, global_batch, make_config, merge_ranks, parity_errors, rank_slice, rel_err, slow, world,
)
from largeep_plugin.layer.moe_layer import LargeEPMoE
from largeep_plugin.layer.reference import DenseMoEReference

MATRIX = list(itertools.product(("gelu", "swiglu"), ("softmax", "sigmoid"), (1, 2)))


def _matrix_rank(rank: int, world_size: int, cases: list[tuple[str, str, int]]) -> dict[str, dict[str, float]]:
    # Uneven token counts per rank, so the all-to-all splits differ in both directions.
    counts = [6 + 3 * r % 7 for r in range(world_size)]
    out = {}
    for i, (act, score, k) in enumerate(cases):
        # Top-1 with normalisation has a constant weight of 1 and no router gradient: test the router there too.
        cfg = make_config(world_size, activation=act, score_function=score, top_k=k, normalize_topk=k > 1)
        out[f"{act}-{score}-top{k}"] = parity_errors(cfg, counts, seed=100 * world_size + i)
    return out


@pytest.mark.parametrize("ep", [2, 4, 8])
def test_forward_backward_match_reference(ep: int) -> None:
    assert_parity(merge_ranks(world(_matrix_rank, ep, MATRIX)))


@slow
def test_forward_backward_match_reference_ep16() -> None:
    cases = [("gelu", "softmax", 2), ("swiglu", "sigmoid", 1)]
    assert_parity(merge_ranks(world(_matrix_rank, 16, cases, timeout=240)))


def _variants_rank(rank: int, world_size: int) -> dict[str, dict[str, float]]:
    counts = [8, 5, 11, 7][:world_size]
    e = world_size
    out = {
        "linear_bias": parity_errors(make_config(e, linear_bias=True), counts, seed=1),
        "linear_bias-swiglu": parity_errors(make_config(e, linear_bias=True, activation="swiglu"), counts, seed=2),
        "no-normalize-softmax": parity_errors(make_config(e, normalize_topk=False), counts, seed=3),
        "no-normalize-sigmoid": parity_errors(
            make_config(e, normalize_topk=False, score_function="sigmoid", top_k=3), counts, seed=4
        ),
        "top1-normalized": parity_errors(make_config(e, top_k=1), counts, seed=10),
        "top_k=E": parity_errors(make_config(e, top_k=e), counts, seed=5),
        # Capacity is decided per rank, so the reference runs on each rank's tokens separately.
        "capacity-0.5": parity_errors(make_config(e, capacity_factor=0.5), counts, seed=6, per_rank_reference=True),
        "capacity-1.0-top1": parity_errors(
            make_config(e, capacity_factor=1.0, top_k=1, activation="swiglu"), counts, seed=7, per_rank_reference=True
        ),
        "bias": parity_errors(make_config(e), counts, seed=8, expert_bias=torch.tensor([0.3, -0.2, 0.0, 0.5])),
    }
    # Inputs of shape [B, S, H]: every rank has 2 x 4 tokens.
    out["BSH"] = parity_errors(make_config(e, top_k=2), [8] * world_size, seed=9, shape=(2, 4, HIDDEN))
    return out


def test_variants_match_reference() -> None:
    """linear_bias, normalize_topk=False, top_k = E, capacity factor, a non-zero selection bias, [B, S, H]."""
    assert_parity(merge_ranks(world(_variants_rank, 4)))


def _capacity_drops_rank(rank: int, world_size: int) -> tuple[int, int]:
    counts = [9, 4, 12, 6]
    cfg = make_config(world_size, capacity_factor=0.5, top_k=2)
    x_GH, _ = global_batch(counts, cfg.hidden_size, seed=6)
    layer = LargeEPMoE(cfg)
    layer(x_GH[rank_slice(counts, rank)])
    ref = DenseMoEReference(cfg)
    want = sum(int((~ref.router(x_GH[rank_slice(counts, r)]).keep_TK).sum()) for r in range(world_size))
    return int(layer.last_stats.dropped), want


def test_capacity_drops_are_counted_globally() -> None:
    results = world(_capacity_drops_rank, 4)
    want = results[0][1]
    assert want > 0, "the capacity factor is meant to drop some assignments here"
    assert [got for got, _ in results] == [want] * 4


def _aux_rank(rank: int, world_size: int) -> dict[str, float]:
    """Per-rank aux losses average to the reference's full-batch aux; the attached aux joins the gradient."""
    counts = [8] * world_size  # equal token counts: the mean of the per-rank losses is the full-batch loss
    cfg = make_config(world_size, aux_loss_coeff=0.5, z_loss_coeff=0.05)
    x_GH, g_GH = global_batch(counts, cfg.hidden_size, seed=11)
    own = rank_slice(counts, rank)

    # return_aux=True: the losses come back instead of being attached.
    layer = LargeEPMoE(cfg)
    _, aux_local = layer(x_GH[own], return_aux=True)
    aux_mean = aux_local.detach().clone()
    dist.all_reduce(aux_mean)
    aux_mean /= world_size
    ref = DenseMoEReference(cfg)
    _, aux_ref = ref(x_GH, return_aux=True)
    stats_sum = (layer.last_stats.aux_loss + layer.last_stats.z_loss).detach()

    # Attached (the default): backward of sum(y * g) also carries d(aux)/d(...). Summed over ranks the per-rank
    # losses are world_size * the full-batch loss, so the reference loss is sum(y * g) + world_size * aux_ref.
    layer = LargeEPMoE(cfg)
    x = x_GH[own].clone().requires_grad_(True)
    (layer(x) * g_GH[own]).sum().backward()
    router_grad = layer.router.weight.grad.clone()
    dist.all_reduce(router_grad)

    ref = DenseMoEReference(cfg)
    x_ref = x_GH.clone().requires_grad_(True)
    y_ref, aux_ref2 = ref(x_ref, return_aux=True)
    ((y_ref * g_GH).sum() + world_size * aux_ref2).backward()

    # The same reference without the aux term: the aux gradient must be a visible part of the router gradient.
    ref_plain = DenseMoEReference(cfg)
    (ref_plain(x_GH) * g_GH).sum().backward()
    return {
        "aux_mean_vs_ref": rel_err(aux_mean, aux_ref.detach()),
        "aux_ref": float(aux_ref),
        "stats_vs_returned": rel_err(stats_sum, aux_local.detach()),
        "router_grad": rel_err(router_grad, ref.router.weight.grad),
        "dx": rel_err(x.grad, x_ref.grad[own]),
        "aux_share_of_router_grad": rel_err(ref_plain.router.weight.grad, ref.router.weight.grad),
    }


def test_aux_and_z_loss_match_reference_and_reach_the_gradient() -> None:
    for rank, r in enumerate(world(_aux_rank, 4)):
        assert r["aux_ref"] > 0.1, r
        assert r["aux_mean_vs_ref"] < 1e-6, (rank, r)
        assert r["stats_vs_returned"] < 1e-6, (rank, r)
        assert r["router_grad"] < 1e-5, (rank, r)
        assert r["dx"] < 1e-5, (rank, r)
        assert r["aux_share_of_router_grad"] > 1e-2, (rank, r)


def test_single_process_layer_matches_reference() -> None:
    """Without torch.distributed the layer is a one-expert MoE on its own: still the reference's math."""
    cfg = make_config(1, top_k=1, score_function="sigmoid", normalize_topk=False, activation="swiglu")
    layer, ref = LargeEPMoE(cfg), DenseMoEReference(cfg)
    x = torch.randn(3, 5, HIDDEN, generator=torch.Generator().manual_seed(0))
    assert layer.ep_size == 1 and layer.expert_id == 0
    assert rel_err(layer(x), ref(x)) < 1e-6
