"""Shared helpers of the test suite.

Shape legend:  T tokens of one rank   G tokens of the whole world   H hidden size   E experts   K top_k

Multi-rank tests run ``fn(rank, world_size, ...)`` in a local gloo world (``world``) and return plain numbers or
strings, so the assertions happen in the pytest process. A world costs a fork and a gloo rendezvous, so each test
runs many configurations inside one world and returns all their errors at once.

The parity helpers (``parity_errors`` and friends) are imported by the test modules with
``from conftest import ...``; they run inside a rank.
"""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist

from largeep_plugin.layer.config import LargeEPConfig
from largeep_plugin.tools.launch import run_world
from largeep_plugin.layer.moe_layer import LargeEPMoE
from largeep_plugin.layer.reference import DenseMoEReference

# The CUDA check lives in the tests, never in the core.
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
slow = pytest.mark.slow

# Tiny sizes keep every world fast; a larger init_std than the default gives O(1) outputs and well separated router
# scores, so an absolute error of 1e-5 really is tight and no top-k choice sits on a near-tie.
HIDDEN = 12
FFN = 16
INIT_STD = 0.4


def world(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0, **kwargs: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks (fork); results in rank order."""
    return run_world(fn, world_size, args=args, timeout=timeout, collective_timeout=60.0, **kwargs)


def make_config(num_experts: int, **overrides: Any) -> LargeEPConfig:
    """A tiny config with test-friendly defaults; ``overrides`` are LargeEPConfig fields."""
    fields: dict[str, Any] = dict(hidden_size=HIDDEN, ffn_hidden_size=FFN, num_experts=num_experts, init_std=INIT_STD)
    fields.update(overrides)
    return LargeEPConfig(**fields)


def global_batch(counts: list[int], hidden: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same global tokens and output cotangent on every rank.

    Returns:
        x_GH: all ranks' tokens, rank 0's first (``counts[r]`` rows for rank r).
        g_GH: a fixed random cotangent: the test loss is sum(y * g).
    """
    gen = torch.Generator().manual_seed(seed)
    total = sum(counts)
    x_GH = torch.randn(total, hidden, generator=gen)
    g_GH = torch.randn(total, hidden, generator=gen)
    return x_GH, g_GH


def rank_slice(counts: list[int], rank: int) -> slice:
    start = sum(counts[:rank])
    return slice(start, start + counts[rank])


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|: 0 when both are all zero, inf when the shapes differ or only ``want`` is 0."""
    if got.shape != want.shape:
        return float("inf")
    if got.numel() == 0:
        return 0.0
    got, want = got.detach(), want.detach()
    diff = float((got.double() - want.double()).abs().max())
    scale = float(want.abs().max())
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def router_grad_error(config: LargeEPConfig, got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative error of a router gradient; absolute for top-1 with renormalised weights, where the one weight is
    s / s = 1: the router gets no gradient, only rounding noise."""
    if config.top_k == 1 and config.normalize_topk:
        return float((got - want).abs().max())
    return rel_err(got, want)


def expert_grads(expert: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for name, p in expert.named_parameters()}


def parity_errors(
    config: LargeEPConfig,
    counts: list[int],
    *,
    seed: int = 0,
    shape: tuple[int, ...] | None = None,
    expert_bias: torch.Tensor | None = None,
    per_rank_reference: bool = False,
) -> dict[str, float]:
    """Run the sharded layer and the dense reference on the same tokens inside a rank; return relative errors.

    Every rank builds the same global batch, feeds its own slice (``counts[rank]`` tokens) to ``LargeEPMoE`` and
    the whole batch to ``DenseMoEReference`` (or, with ``per_rank_reference``, each rank's slice separately, as
    capacity is decided per call). Loss = sum(y * g). Compared: the output, the input gradient, the router weight
    gradient summed over ranks, and every gradient of the expert this rank holds.

    Args:
        shape: the shape the rank's tokens are fed in (default [T, H]); its product over all but the last
            dimension must be ``counts[rank]``.
        expert_bias: a selection bias set on both models.
    Returns:
        ``{"y": err, "dx": err, "router": err, "expert.<param>": err, ...}`` plus ``"ref_scale"``, the smallest
        max |value| of the reference output and gradients (to show that the comparison is not of zeros).
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    x_GH, g_GH = global_batch(counts, config.hidden_size, seed)
    own = rank_slice(counts, rank)

    layer = LargeEPMoE(config)
    ref = DenseMoEReference(config)
    if expert_bias is not None:
        layer.router.expert_bias.copy_(expert_bias)
        ref.router.expert_bias.copy_(expert_bias)

    x = x_GH[own].clone().reshape(shape or (counts[rank], config.hidden_size)).requires_grad_(True)
    y = layer(x)
    (y.reshape(-1, config.hidden_size) * g_GH[own]).sum().backward()

    x_ref = x_GH.clone().requires_grad_(True)
    if per_rank_reference:
        y_ref = torch.cat([ref(x_ref[rank_slice(counts, r)]) for r in range(world_size)])
    else:
        y_ref = ref(x_ref)
    (y_ref * g_GH).sum().backward()

    router_grad = layer.router.weight.grad.clone()
    dist.all_reduce(router_grad)
    want_expert = expert_grads(ref.experts[layer.expert_id])
    got_expert = expert_grads(layer.expert)

    errors = {
        "y": rel_err(y.detach().reshape(-1, config.hidden_size), y_ref.detach()[own]),
        "dx": rel_err(x.grad.reshape(-1, config.hidden_size), x_ref.grad[own]),
    }
    scales = [y_ref.abs().max(), x_ref.grad.abs().max()]
    errors["router"] = router_grad_error(config, router_grad, ref.router.weight.grad)
    if not (config.top_k == 1 and config.normalize_topk):
        scales.append(ref.router.weight.grad.abs().max())
    for name, want in want_expert.items():
        errors[f"expert.{name}"] = rel_err(got_expert[name], want)
    errors["ref_scale"] = float(min(scales).detach()) if y_ref.numel() else 0.0
    return errors


def assert_parity(results: dict[str, dict[str, float]], tol: float = 1e-5, min_scale: float = 1e-3) -> None:
    """``results``: {case name: parity_errors(...)} (one rank's, or merged with ``merge_ranks``)."""
    bad = {
        case: {k: v for k, v in errs.items() if k != "ref_scale" and not v <= tol}
        for case, errs in results.items()
    }
    bad = {case: errs for case, errs in bad.items() if errs}
    assert not bad, f"sharded layer differs from the dense reference (relative error > {tol}): {bad}"
    flat = {case: errs["ref_scale"] for case, errs in results.items() if errs["ref_scale"] < min_scale}
    assert not flat, f"reference values too small for the comparison to mean anything: {flat}"


def merge_ranks(per_rank: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Worst error over ranks for each case and quantity (ref_scale: the smallest)."""
    merged: dict[str, dict[str, float]] = {}
    for rank_results in per_rank:
        for case, errs in rank_results.items():
            into = merged.setdefault(case, {})
            for k, v in errs.items():
                pick = min if k == "ref_scale" else max
                into[k] = pick(into.get(k, v), v)
    return merged
