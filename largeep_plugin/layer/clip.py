"""Gradient clipping by the norm of the whole model: dense parameters once, every logical expert once.

``torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)`` on one rank of an expert-parallel model takes the
norm of what that rank holds: the dense parameters and its own experts. Every rank gets another norm, so another
clipping coefficient, and the dense parameters, the same on every rank before the step, drift apart after it. The
norm wanted is the unconverted model's:

    ||g||_p^p = sum over the dense parameters    (the same on every rank once reduced: taken from this rank)
              + sum over the logical experts     (each taken on one of its holders, summed over the ranks)

An expert parameter is counted by one of its holders (``grads.counted_here``: the lowest global rank of each of
its holder groups, ``param.expert_dp_group`` or ``expert_group``, and a route's replica group). Dynamic clones
(buffers, not parameters) never enter.

One all_reduce of one number per call (SUM of the experts' share of ||g||_p^p; MAX for the inf-norm) over
``group``, the ranks that together hold the model (default: the world). Nothing is read back to the host: the norm
and the coefficient stay tensors, as in torch's own ``clip_grad_norm_`` (``error_if_nonfinite=True`` reads the norm,
as there).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from .comm import ProcessGroup, group_size
from .grads import counted_here, is_expert_param


def _norm(tensors: list[torch.Tensor], norm_type: float, device: torch.device) -> torch.Tensor:
    """The p-norm of ``tensors`` viewed as one vector, float32 on ``device`` (0 for none)."""
    if not tensors:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.nn.utils.get_total_norm(tensors, norm_type).to(device=device, dtype=torch.float32)


def grad_norm(params: Iterable[nn.Parameter] | nn.Module, norm_type: float = 2.0, *,
              group: ProcessGroup | None = None, expert_group: ProcessGroup | None = None) -> torch.Tensor:
    """The norm of the whole model's gradient (module docstring); collective over ``group``.

    Args:
        params: a model or its parameters (those without a gradient are skipped, as torch does).
        norm_type: p of the p-norm, > 0, or ``inf``.
        group: the ranks that together hold the model (None: the world).
        expert_group: every expert parameter's copies over data parallelism, instead of its ``expert_dp_group``
            (Megatron's expert-data-parallel group).
    Returns:
        float32 0-d tensor on the gradients' device, the same on every rank of ``group``.
    """
    norm_type = float(norm_type)
    if not norm_type > 0:
        raise ValueError(f"norm_type={norm_type}: must be > 0 or inf")
    params = list(params.parameters() if isinstance(params, nn.Module) else params)
    grads = [p for p in params if p.grad is not None]
    device = grads[0].grad.device if grads else torch.device("cpu")
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    lowest: dict[int, int] = {}
    dense = [p.grad for p in grads if not is_expert_param(p)]
    experts = [p.grad for p in grads if is_expert_param(p) and counted_here(p, rank, expert_group, lowest)]
    dense_norm = _norm(dense, norm_type, device)
    expert_norm = _norm(experts, norm_type, device)
    distributed = group_size(group) > 1
    if math.isinf(norm_type):
        if distributed:
            dist.all_reduce(expert_norm, op=dist.ReduceOp.MAX, group=group)
        return torch.maximum(dense_norm, expert_norm)
    expert_power = expert_norm.pow(norm_type)
    if distributed:
        dist.all_reduce(expert_power, group=group)
    return (dense_norm.pow(norm_type) + expert_power).pow(1.0 / norm_type)


def clip_grad_norm_(params: Iterable[nn.Parameter] | nn.Module, max_norm: float, norm_type: float = 2.0, *,
                    group: ProcessGroup | None = None, expert_group: ProcessGroup | None = None,
                    error_if_nonfinite: bool = False) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a model holding large-EP layers: every rank scales its gradients by
    the same coefficient, ``min(1, max_norm / (norm + 1e-6))`` of the whole model's norm (``grad_norm``).

    Call it after the gradient reduction (``allreduce_gradients``, DDP) and before ``optimizer.step()``, on every
    rank of ``group`` (collective: one all_reduce of one number).

    Args:
        params, norm_type, group, expert_group: as ``grad_norm``.
        max_norm: the largest norm let through, >= 0.
        error_if_nonfinite: RuntimeError when the norm is NaN or inf (reads it back to the host, as torch does).
    Returns:
        the norm before clipping (float32 0-d tensor, the same on every rank).
    """
    if not (isinstance(max_norm, (int, float)) and not isinstance(max_norm, bool) and max_norm >= 0):
        raise ValueError(f"max_norm={max_norm!r}: must be a number >= 0")
    params = list(params.parameters() if isinstance(params, nn.Module) else params)
    total = grad_norm(params, norm_type, group=group, expert_group=expert_group)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(f"the total norm of order {float(norm_type)} of the gradients is {float(total)}: "
                           "non-finite (error_if_nonfinite=True)")
    torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, total)
    return total
