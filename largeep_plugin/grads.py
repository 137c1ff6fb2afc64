"""Gradient reduction for models that hold large-EP layers, for trainers without a framework's DDP.

Non-expert parameters (attention, embeddings, the router) are data-parallel over the EP group: their gradients
are averaged over it. Expert parameters carry ``allreduce = False`` and are skipped here; replicated experts are
reduced over their replica group by ``process_groups.py``.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .comm import ProcessGroup, group_size


def is_expert_param(p: torch.nn.Parameter) -> bool:
    """True for parameters that must not be all-reduced over the data-parallel group."""
    return getattr(p, "allreduce", True) is False


def allreduce_gradients(
    params: Iterable[nn.Parameter] | nn.Module, group: ProcessGroup | None = None, average: bool = True
) -> int:
    """Average (or sum) the gradients of the non-expert parameters over ``group`` in one flat all_reduce per
    dtype. Parameters without a gradient are skipped. Returns the number of gradients reduced."""
    if isinstance(params, nn.Module):
        params = params.parameters()
    grads = [p.grad for p in params if p.grad is not None and not is_expert_param(p)]
    world = group_size(group)
    if world == 1 or not grads:
        return len(grads)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = _flatten_dense_tensors(same)
        dist.all_reduce(flat, group=group)
        if average:
            flat.div_(world)
        for g, reduced in zip(same, _unflatten_dense_tensors(flat, same)):
            g.copy_(reduced)
    return len(grads)
