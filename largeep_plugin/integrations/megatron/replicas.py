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

Megatron's gradient clipping (``OptimizerConfig.clip_grad``) takes the norm of the expert parameters over the
expert model-parallel group (TP x EP x PP), so a replicated expert would count once per replica: every replica but
the first is marked ``shared``, which Megatron's norm skips (``param_is_not_shared``), as it does for a tied
embedding.

Megatron-LM's ``train()`` sets ``config.finalize_model_grads_func`` itself, so the Megatron-LM route refuses
replicas; a Megatron-Core training loop (``examples/pretrain_gpt_largeep.py``) calls this once after building the
DDP model.
"""
from __future__ import annotations

from typing import Any, Callable

import torch.distributed as dist
from megatron.core.distributed import finalize_model_grads

from largeep_plugin.layer.grads import REPLICA_GROUP_ATTR, counted_here, reduce_expert_gradients
from largeep_plugin.layer.process_groups import build_replica_groups, ep_partition, ep_ranks_of
from .layer import large_ep_moe_layers



def attach_replica_groups(model: Any) -> int:
    """Give every replicated layer's expert parameters the group of their replicas inside the EP group
    (``process_groups.build_replica_groups``), once. Collective (it creates process groups): call it on every rank,
    as ``enable_replica_gradient_sum`` and ``GlooDataParallel`` do. Layers with the same layout share their groups.
    Returns the number of replicated layers."""
    built: dict[tuple[Any, ...], dict[int, Any]] = {}
    layers = 0
    for _, layer in large_ep_moe_layers(model):
        if not layer.replicated:
            continue
        layers += 1
        if getattr(layer, "replica_groups", None) is not None:
            continue
        copies = ep_partition(ep_ranks_of(layer.ep_group))
        key = (layer.rank_to_experts, tuple(map(tuple, copies)))
        if key not in built:
            built[key] = build_replica_groups(layer.rank_to_experts, copies)
        layer.replica_groups = built[key]
        for expert_id, module in layer.experts.experts_by_id():
            for p in module.parameters():
                setattr(p, REPLICA_GROUP_ATTR, layer.replica_groups[expert_id])
                # Megatron's gradient norm (clip_grad) sums each expert parameter over the expert model-parallel
                # group, EP included: a replica would count once per copy. ``shared`` is how Megatron leaves a
                # parameter held twice (a tied embedding) out of the norm: all replicas but the first get it.
                if not counted_here(p, dist.get_rank()):
                    p.shared = True
    return layers


def sum_replica_gradients_(model: Any) -> int:
    """Sum, in place, the gradients of every expert replicated inside its EP group over its replicas there.

    A placement with EP > experts sends each token to one replica, so each replica's gradient covers only the
    tokens it received; after the sum every replica holds the gradient of all of them, as a lone expert would,
    and the replicas stay identical through the optimizer step. Each expert is reduced over its own replica group
    (``grads.reduce_expert_gradients``): the memory and traffic of that expert's parameters, nothing for experts
    held once. The gradient is ``param.main_grad`` where Megatron's DDP keeps one, ``param.grad`` otherwise.
    Returns the number of layers reduced. Collective over the replica groups (built on first use).
    """
    attach_replica_groups(model)
    layers = 0
    for _, layer in large_ep_moe_layers(model):
        if layer.replicated:
            reduce_expert_gradients(layer.experts.parameters(), group_attr=REPLICA_GROUP_ATTR, main_grad=True)
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
    for chunk in chunks:
        attach_replica_groups(chunk)
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
