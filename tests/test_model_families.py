"""The MoE shapes people train, sharded over gloo ranks, against the independent dense reference (reference.py).

Forward and backward: the output, the input gradient, the router gradients (weight, and bias for gpt-oss), every
routed expert's gradients (expert e on its rank(s) vs the reference's expert e), the shared expert's and its gate's
gradients (summed over ranks: each rank's copy saw its own tokens), and the balancing loss (mean over ranks of the
per-rank losses vs the reference's loss of the whole batch: every rank feeds [2, 4, H], two sequences of 4).

    DeepSeek-V3   sigmoid scores, a selection bias, 16 experts in 4 groups (keep 2), top-4, routed scaling 2.5,
                  SwiGLU, a shared expert, the sequence-wise loss; 16 experts on 4 ranks = colocated (4 per rank)
    Qwen2-MoE     softmax without renormalisation, SwiGLU, a shared expert with a sigmoid gate
    gpt-oss       a router bias, expert biases, clamped SwiGLU (swiglu_oai), softmax renormalised over the top-k

Colocated experts run as a loop and, with ``grouped_gemm``, as grouped GEMMs. Each runs on the flat path, chunked (``overlap_chunks``), node-batched (``dispatch="hierarchical"``, 2 nodes of 2)
and node-batched + chunked; colocated and replicated placements too. One world of 4 ranks runs them all, and
one world of 8 ranks runs DeepSeek-V3 on 2 nodes of 4.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist

from conftest import assert_parity, merge_ranks, rel_err, world
from largeep_plugin.layer.config import LargeEPConfig
from largeep_plugin.layer.grads import allreduce_gradients
from largeep_plugin.layer.moe_layer import LargeEPMoE
from largeep_plugin.layer.reference import DenseMoEReference
from largeep_plugin.placement.plan import Placement
from largeep_plugin.placement.topology import Topology

HIDDEN = 12


def deepseek_v3(**kw: Any) -> LargeEPConfig:
    fields = dict(hidden_size=HIDDEN, ffn_hidden_size=8, num_experts=16, top_k=4, activation="swiglu",
                  score_function="sigmoid", num_groups=4, group_topk=2, routed_scaling_factor=2.5,
                  shared_ffn_hidden_size=16, seq_aux_loss_coeff=0.01, init_std=0.4)
    return LargeEPConfig(**{**fields, **kw})


def qwen2_moe(**kw: Any) -> LargeEPConfig:
    fields = dict(hidden_size=HIDDEN, ffn_hidden_size=8, num_experts=4, top_k=2, activation="swiglu",
                  score_function="softmax", normalize_topk=False, shared_ffn_hidden_size=20,
                  shared_expert_gate=True, init_std=0.4)
    return LargeEPConfig(**{**fields, **kw})


def gpt_oss(**kw: Any) -> LargeEPConfig:
    # A larger init_std than the others, so that the clamps at +-limit are reached (limit 1.5 here).
    fields = dict(hidden_size=HIDDEN, ffn_hidden_size=8, num_experts=4, top_k=2, activation="swiglu_oai",
                  swiglu_limit=1.5, router_bias=True, linear_bias=True, init_std=0.6)
    return LargeEPConfig(**{**fields, **kw})


def _placement(rank_to_experts: tuple[tuple[int, ...], ...], num_experts: int, nodes: int = 1) -> Placement:
    return Placement(topology=Topology.uniform(nodes, len(rank_to_experts) // nodes), num_experts=num_experts,
                     rank_to_experts=rank_to_experts)


def _set_bias_and_biases(layer: LargeEPMoE, ref: DenseMoEReference, seed: int) -> None:
    """A non-zero selection bias, and non-zero linear biases (they start at zero), the same in both models."""
    gen = torch.Generator().manual_seed(seed)
    cfg = layer.config
    bias_E = torch.randn(cfg.num_experts, generator=gen) * 0.05
    layer.router.expert_bias.copy_(bias_E)
    ref.router.expert_bias.copy_(bias_E)
    if not cfg.linear_bias:
        return
    with torch.no_grad():
        for e, expert in enumerate(ref.experts):
            expert.fc1.bias.copy_(torch.randn(expert.fc1.bias.shape, generator=gen) * 0.3)
            expert.fc2.bias.copy_(torch.randn(expert.fc2.bias.shape, generator=gen) * 0.3)
        for e, module in layer.local_experts():
            for name, p in module.named_parameters():
                if name.endswith("bias"):
                    p.copy_(ref.experts[e].get_parameter(name))


def family_parity(cfg: LargeEPConfig, seed: int, placement: Placement | None = None, **layer_kw: Any) -> dict[str, float]:
    """Errors of one configuration inside a rank (see the module docstring)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # colocation warns once
        layer = LargeEPMoE(cfg, placement=placement, **layer_kw)
    ref = DenseMoEReference(cfg)
    _set_bias_and_biases(layer, ref, seed)
    gen = torch.Generator().manual_seed(seed)
    x_all = torch.randn(world_size, 2, 4, HIDDEN, generator=gen)
    g_all = torch.randn(world_size, 2, 4, HIDDEN, generator=gen)

    x = x_all[rank].clone().requires_grad_(True)
    y, aux = layer(x, return_aux=True)
    (y * g_all[rank]).sum().backward()
    allreduce_gradients(layer, average=False)  # dense: summed over ranks; experts: over their replicas
    aux_mean = aux.detach().clone()
    dist.all_reduce(aux_mean)
    aux_mean /= world_size

    x_ref = x_all.reshape(world_size * 2, 4, HIDDEN).clone().requires_grad_(True)
    y_ref, aux_ref = ref(x_ref, return_aux=True)
    (y_ref * g_all.reshape_as(y_ref)).sum().backward()
    own = slice(2 * rank, 2 * rank + 2)

    errors = {"y": rel_err(y.detach(), y_ref.detach()[own]), "dx": rel_err(x.grad, x_ref.grad[own]),
              "router.weight": rel_err(layer.router.weight.grad, ref.router.weight.grad)}
    scales = [y_ref.abs().max(), x_ref.grad.abs().max(), ref.router.weight.grad.abs().max()]
    if cfg.router_bias:
        errors["router.bias"] = rel_err(layer.router.bias.grad, ref.router.bias.grad)
    for e, module in layer.local_experts():
        for name, p in module.named_parameters():
            want = _grad(ref.experts[e].get_parameter(name))  # zero for an expert no token chose
            errors[f"expert.{name}"] = max(errors.get(f"expert.{name}", 0.0), rel_err(_grad(p), want))
    for part in ("shared_expert", "shared_expert_gate"):
        module = getattr(layer, part)
        if module is None:
            continue
        for name, p in module.named_parameters():
            want = getattr(ref, part).get_parameter(name).grad
            errors[f"{part}.{name}"] = rel_err(p.grad, want)
            scales.append(want.abs().max())
            assert getattr(p, "allreduce", True) is True  # dense: averaged like the router
    if cfg.seq_aux_loss_coeff > 0 or cfg.global_aux_loss_coeff > 0:
        errors["aux"] = rel_err(aux_mean, aux_ref.detach())
        scales.append(aux_ref.abs())
    errors["ref_scale"] = float(min(float(s) for s in scales))
    return errors


def _grouped_plan() -> Placement:
    from largeep_plugin.placement.groups import max_nodes_per_token
    from largeep_plugin.placement.plan import plan_placement

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        placement = plan_placement(16, Topology.uniform(2, 2), allow_colocate=True, expert_groups=4)
    assert max_nodes_per_token(placement, 4, 1) == 1
    return placement


def _grad(p: torch.Tensor) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


def _families_rank(rank: int, world_size: int) -> dict[str, dict[str, float]]:
    coloc_1x4 = _placement(tuple(tuple(range(4 * r, 4 * r + 4)) for r in range(4)), 16)
    coloc_2x2 = _placement(tuple(tuple(range(4 * r, 4 * r + 4)) for r in range(4)), 16, nodes=2)
    # Groups of 4 experts spread over the ranks: a routing group is not a rank (the dispatch does not care).
    coloc_spread = _placement(tuple(tuple(range(r, 16, 4)) for r in range(4)), 16)
    replicated_2x2 = _placement(((0, 1), (2, 3), (1, 2), (0, 3)), 4, nodes=2)
    hier = dict(dispatch="hierarchical")
    out = {
        "dsv3-flat": family_parity(deepseek_v3(), 1, coloc_1x4),
        "dsv3-flat-spread": family_parity(deepseek_v3(), 2, coloc_spread),
        "dsv3-chunks3": family_parity(deepseek_v3(overlap_chunks=3), 3, coloc_1x4),
        "dsv3-hier": family_parity(deepseek_v3(**hier), 4, coloc_2x2),
        "dsv3-hier-chunks2": family_parity(deepseek_v3(overlap_chunks=2, **hier), 5, coloc_2x2),
        "qwen2-flat": family_parity(qwen2_moe(), 6),
        "qwen2-chunks2": family_parity(qwen2_moe(overlap_chunks=2), 7),
        "qwen2-hier": family_parity(qwen2_moe(**hier), 8, ranks_per_node=2),
        "qwen2-hier-chunks2": family_parity(qwen2_moe(overlap_chunks=2, **hier), 9, ranks_per_node=2),
        "qwen2-replicated-hier": family_parity(qwen2_moe(**hier), 10, replicated_2x2),
        "qwen2-replicated-chunks2": family_parity(qwen2_moe(overlap_chunks=2), 11, replicated_2x2),
        "gptoss-flat": family_parity(gpt_oss(), 12),
        "gptoss-chunks2": family_parity(gpt_oss(overlap_chunks=2), 13),
        "gptoss-hier": family_parity(gpt_oss(**hier), 14, ranks_per_node=2),
        "gptoss-colocated-hier-chunks2": family_parity(gpt_oss(num_experts=8, overlap_chunks=2, **hier), 15,
                                                       _placement(((0, 1), (2, 3), (4, 5), (6, 7)), 8, nodes=2)),
        # Planned with the routing groups kept on one node each (4 groups, 2 nodes of 2 ranks, 4 experts a rank).
        "dsv3-grouped-placement-hier": family_parity(deepseek_v3(dispatch="hierarchical"), 18, _grouped_plan()),
        # Colocated experts as grouped GEMMs (torch._grouped_mm) instead of a loop over them.
        "dsv3-grouped-gemm": family_parity(deepseek_v3(grouped_gemm=True), 16, coloc_1x4),
        "gptoss-grouped-gemm-hier-chunks2": family_parity(
            gpt_oss(num_experts=8, overlap_chunks=2, grouped_gemm=True, **hier), 17,
            _placement(((0, 1), (2, 3), (4, 5), (6, 7)), 8, nodes=2)),
    }
    out["shared-expert-in-flight"] = shared_expert_overlaps()
    return out


def shared_expert_overlaps() -> dict[str, float]:
    """On every path the shared expert runs after a token all-to-all is started and before it is waited for:
    1.0 (an error) for a path where it does not."""
    from largeep_plugin.layer import comm

    events: list[str] = []
    start, wait = comm.start_all_to_all, comm.PendingAllToAll.wait

    def logged_start(*args: Any, **kwargs: Any) -> Any:
        events.append("start")
        return start(*args, **kwargs)

    def logged_wait(self: Any) -> Any:
        events.append("wait")
        return wait(self)

    comm.start_all_to_all, comm.PendingAllToAll.wait = logged_start, logged_wait
    errors = {"ref_scale": 1.0}
    try:
        for name, kw in (("flat", {}), ("chunks2", dict(overlap_chunks=2)), ("hier", dict(dispatch="hierarchical")),
                         ("hier-chunks2", dict(overlap_chunks=2, dispatch="hierarchical"))):
            layer = LargeEPMoE(qwen2_moe(**kw), ranks_per_node=2 if "hier" in name else None)
            layer.shared_expert.register_forward_pre_hook(lambda *_: events.append("shared"))
            events.clear()
            layer(torch.randn(2, 4, HIDDEN)).sum().backward()
            before = events[: events.index("shared")]
            errors[name] = 0.0 if before.count("start") > before.count("wait") else 1.0
    finally:
        comm.start_all_to_all, comm.PendingAllToAll.wait = start, wait
    return errors


def test_model_families_match_the_reference_at_ep4() -> None:
    assert_parity(merge_ranks(world(_families_rank, 4, timeout=300)))


def _families_rank_ep8(rank: int, world_size: int) -> dict[str, dict[str, float]]:
    coloc_2x4 = _placement(tuple((2 * r, 2 * r + 1) for r in range(8)), 16, nodes=2)
    return {
        "dsv3-flat": family_parity(deepseek_v3(), 21, coloc_2x4),
        "dsv3-hier-chunks2": family_parity(deepseek_v3(overlap_chunks=2, dispatch="hierarchical"), 22, coloc_2x4),
    }


def test_deepseek_v3_matches_the_reference_at_ep8() -> None:
    assert_parity(merge_ranks(world(_families_rank_ep8, 8, timeout=300)))


def test_gpt_oss_case_reaches_the_clamp() -> None:
    """The gpt-oss case really exercises the clamps: a good share of the fc1 outputs lie beyond +-limit."""
    cfg = gpt_oss()
    ref = DenseMoEReference(cfg)
    x = torch.randn(4, 2, 4, HIDDEN, generator=torch.Generator().manual_seed(12)).reshape(-1, HIDDEN)
    h = torch.cat([x @ expert.fc1.weight.t() for expert in ref.experts])
    assert float((h.abs() > cfg.swiglu_limit).float().mean()) > 0.05


def test_deepseek_v3_in_bf16_and_under_autocast() -> None:
    """One process holding all 16 experts: in a bf16 model and under bf16 autocast the routing is the float32
    reference's exactly (the router computes in float32) and the output is within bf16 rounding of it."""
    cfg = deepseek_v3()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = LargeEPMoE(cfg, placement=_placement((tuple(range(16)),), 16))
    ref = DenseMoEReference(cfg)
    x = torch.randn(2, 4, HIDDEN, generator=torch.Generator().manual_seed(3))
    want = ref(x).detach()
    want_ids = ref.router(x.reshape(-1, HIDDEN)).topk_ids_TK
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = layer(x)
        assert torch.equal(layer.router(x.reshape(-1, HIDDEN)).topk_ids_TK, want_ids)
    layer = layer.to(torch.bfloat16)
    x16 = x.bfloat16()
    got = layer(x16)
    assert got.dtype == torch.bfloat16 and layer.router.expert_bias.dtype == torch.float32
    with torch.no_grad():  # the reference routes with the bf16 model's (rounded) router weight, in float32
        ref.router.weight.copy_(layer.router.weight.float())
    assert torch.equal(layer.router(x16.reshape(-1, HIDDEN)).topk_ids_TK,
                       ref.router(x16.float().reshape(-1, HIDDEN)).topk_ids_TK)
    assert rel_err(under.float(), want) < 3e-2 and rel_err(got.float(), want) < 5e-2


def test_grouped_gemm_refuses_unaligned_rows() -> None:
    from largeep_plugin.layer.experts import LocalExperts

    cfg = LargeEPConfig(hidden_size=10, ffn_hidden_size=8, num_experts=2, grouped_gemm=True)
    experts = LocalExperts(cfg.expert_config, expert_ids=(0, 1))
    import pytest

    with pytest.raises(ValueError, match=r"\{'hidden_size': 10\} in torch.float32"):
        experts(torch.randn(3, 10), [[1, 2]])
