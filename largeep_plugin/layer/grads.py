"""Gradient reduction for models that hold large-EP layers, for trainers without a framework's DDP.

The convention is the data-parallel one: each rank's loss is a mean over its own tokens, and the gradient wanted
is that of the mean over the ``R`` ranks of ``group``.

* Non-expert parameters (attention, embeddings, the router) are replicated: their gradients are averaged over
  ``group``.
* Expert parameters carry ``allreduce = False``. The all-to-all backward already sums, into an expert's gradient,
  the contributions of every rank that sent it tokens; when the expert is replicated, each replica holds the sum
  over the tokens *it* received, so the replicas' gradients are summed over the expert's replica group
  (``param.expert_dp_group``, set by ``LargeEPMoE``). Either way the result is then divided by ``R`` like the
  dense gradients, so that dense and expert parameters see one consistent loss.

With ``average=False`` nothing is divided: the gradient of the *sum* of the ranks' losses.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .comm import ProcessGroup, group_size


def is_expert_param(p: torch.nn.Parameter) -> bool:
    """True for parameters that must not be all-reduced over the data-parallel group."""
    return getattr(p, "allreduce", True) is False


def allreduce_flat(tensors: Sequence[torch.Tensor], group: ProcessGroup | None) -> None:
    """Sum ``tensors`` over ``group`` in place, with one all_reduce per dtype (flattened)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        flat = _flatten_dense_tensors(same)
        dist.all_reduce(flat, group=group)
        for t, reduced in zip(same, _unflatten_dense_tensors(flat, same)):
            t.copy_(reduced)


def allreduce_gradients(
    params: Iterable[nn.Parameter] | nn.Module, group: ProcessGroup | None = None, average: bool = True
) -> int:
    """Reduce the gradients of a model's parameters as described in the module docstring.

    Every rank must call this with the same model structure (the collectives follow parameter order).
    Trainable parameters without a gradient get a zero one (as DDP does), so the collectives always match.
    Returns the number of gradients reduced.
    """
    if isinstance(params, nn.Module):
        params = params.parameters()
    params = [p for p in params if p.requires_grad]
    for p in params:
        # A parameter that got no gradient on this rank (an expert that received no token, an unused branch)
        # still joins the collectives with zeros, so that every rank reduces the same tensors.
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    world = group_size(group)
    dense = [p.grad for p in params if not is_expert_param(p)]
    # Expert gradients, per replica group, in parameter order (identical on the ranks of a group).
    replicated: dict[int, tuple[ProcessGroup, list[torch.Tensor]]] = {}
    for p in params:
        g = getattr(p, "expert_dp_group", None)
        if is_expert_param(p) and g is not None:
            replicated.setdefault(id(g), (g, []))[1].append(p.grad)
    if world > 1 and dense:
        allreduce_flat(dense, group)
    for g, grads in replicated.values():
        allreduce_flat(grads, g)
    if average and world > 1:
        for p in params:
            p.grad.div_(world)
    return len(params)
