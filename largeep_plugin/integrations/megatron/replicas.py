"""Replicated experts (a placement with EP > experts) under Megatron's gradient reduction.

A placement that replicates an expert inside the EP group sends each token to one replica, so each replica's
gradient covers only its own tokens; the replicas must sum their gradients before the optimizer step, or they
drift apart. Megatron's DDP reduces expert gradients over the expert-data-parallel group only (the same EP rank in
every data-parallel copy), never over replicas inside one EP group, so the layer refuses to train replicated
unless something sums them:

    * on CPU, ``GlooDataParallel.finish_grad_sync`` calls ``sum_replica_gradients_`` itself;
    * with Megatron's DDP, ``enable_replica_gradient_sum(model, config)`` makes ``config.finalize_model_grads_func``
      (what Megatron's schedules call after the backward) run Megatron's ``finalize_model_grads`` and then
      ``sum_replica_gradients_`` on the ``main_grad`` buffers. Summing after Megatron's reduction is the same as
      summing before it: the expert-DP average and the per-token scaling are linear, and under the distributed
      optimizer every replica holds the same shard of its buffer (replicas sit in one EP group, so they share
      their expert-DP rank).

Megatron-LM's ``train()`` sets ``config.finalize_model_grads_func`` itself, so the Megatron-LM route refuses
replicas; a Megatron-Core training loop (``examples/pretrain_gpt_largeep.py``) calls this once after building the
DDP model.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron.core.distributed import finalize_model_grads

from .layer import large_ep_moe_layers


def _gradient_of(param: torch.Tensor) -> torch.Tensor:
    """Where this parameter's gradient lives: Megatron DDP's ``main_grad`` or ``.grad`` (zero-filled if None)."""
    main = getattr(param, "main_grad", None)
    if main is not None:
        return main
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    return param.grad


def sum_replica_gradients_(model: Any) -> int:
    """Sum, in place, the gradients of every expert replicated inside its EP group over its replicas there.

    A placement with EP > experts sends each token to one replica, so each replica's gradient covers only the
    tokens it received; after the sum every replica holds the gradient of all of them, as a lone expert would,
    and the replicas stay identical through the optimizer step. One all_reduce per layer over the EP group, of a
    [E, N] buffer (N: one expert's parameter count) where each rank fills the rows of the experts it holds: no
    extra process groups. The gradient is ``param.main_grad`` where Megatron's DDP keeps one, ``param.grad``
    otherwise; parameters without either count as zero. Returns the number of layers reduced.
    """
    layers = 0
    for _, layer in large_ep_moe_layers(model):
        if not layer.replicated:
            continue
        held = layer.experts.experts_by_id()
        params = [list(module.parameters()) for _, module in held]
        grads = [[_gradient_of(p) for p in group] for group in params]
        flat_EN = grads[0][0].new_zeros((layer.large_ep_config.num_experts, sum(g.numel() for g in grads[0])))
        for (expert_id, _), group in zip(held, grads):
            flat_EN[expert_id] = _flatten_dense_tensors(group)
        dist.all_reduce(flat_EN, group=layer.ep_group)
        for (expert_id, _), group in zip(held, grads):
            for g, reduced in zip(group, _unflatten_dense_tensors(flat_EN[expert_id], group)):
                g.copy_(reduced)
        layers += 1
    return layers


def enable_replica_gradient_sum(model: Any, config: Any) -> int:
    """Let replicated large-EP layers train under Megatron's own DDP.

    Sets ``config.finalize_model_grads_func`` to the function already there (Megatron's ``finalize_model_grads``
    when none is) followed by ``sum_replica_gradients_`` on every model chunk, and marks the replicated layers as
    summed. Idempotent. Call it once, on every rank, after wrapping the model in Megatron's DDP.

    Args:
        model: the model or its list of chunks (DDP-wrapped or not: the layers are found either way).
        config: the ``TransformerConfig`` the schedules read ``finalize_model_grads_func`` from.
    Returns:
        the number of replicated layers.
    """
    chunks = model if isinstance(model, (list, tuple)) else [model]
    inner = config.finalize_model_grads_func
    if not getattr(inner, "sums_large_ep_replicas", False):
        config.finalize_model_grads_func = _with_replica_sum(inner or finalize_model_grads)
    replicated = 0
    for chunk in chunks:
        for _, layer in large_ep_moe_layers(chunk):
            if layer.replicated:
                layer.replica_grads_summed = True
                replicated += 1
    return replicated


def _with_replica_sum(finalize: Callable[..., Any]) -> Callable[..., Any]:
    def finalize_and_sum_replicas(model: list[Any], *args: Any, **kwargs: Any) -> Any:
        out = finalize(model, *args, **kwargs)
        for chunk in model:
            sum_replica_gradients_(chunk)
        return out

    finalize_and_sum_replicas.sums_large_ep_replicas = True  # type: ignore[attr-defined]
    return finalize_and_sum_replicas
