"""The one gradient reduction of models that hold large-EP layers: every trainer path calls it.

The convention is the data-parallel one: each rank's loss is a mean over its own tokens, and the gradient wanted
is that of the mean over the ``R`` ranks of ``group``.

* Non-expert parameters (attention, embeddings, the router, shared experts) are replicated: their gradients are
  averaged over ``group``.
* Expert parameters carry ``allreduce = False``. The all-to-all backward already sums, into an expert's gradient,
  the contributions of every rank that sent it tokens; when the expert is replicated, each replica holds the sum
  over the tokens *it* received, so the replicas' gradients are summed over the expert's own group (by default
  ``param.expert_dp_group``, set by ``LargeEPMoE``: every rank, in every data-parallel copy, holding the same
  expert), one expert's parameters at a time: the memory and traffic of the experts a rank holds, never [E, ...].
  The result is then divided by ``R`` like the dense gradients, so that dense and expert parameters see one
  consistent loss.

Who calls it:
    plain PyTorch, the demo             ``allreduce_gradients(model)``
    Megatron on CPU (GlooDataParallel)  ``allreduce_gradients(model, dp_cp_group, expert_group=expt_dp_group)``,
                                        after ``reduce_expert_gradients`` over each replica group
    Megatron's own DDP                  ``reduce_expert_gradients(..., group_attr=<replica group>, main_grad=True)``
                                        after Megatron's reduction (integrations/megatron/replicas.py)

With ``average=False`` nothing is divided: the gradient of the *sum* of the ranks' losses.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .comm import ProcessGroup, group_size

# ``group_attr`` default: the attribute ``LargeEPMoE`` sets on its experts' parameters.
EXPERT_GROUP_ATTR = "expert_dp_group"
# The attribute routes set on a replicated expert's parameters: the ranks of its own EP group holding the same
# expert, for trainers whose data-parallel reduction already spans the copies (DeepSpeed, Megatron).
REPLICA_GROUP_ATTR = "large_ep_replica_group"


def is_expert_param(p: torch.nn.Parameter) -> bool:
    """True for parameters that must not be all-reduced over the data-parallel group."""
    return getattr(p, "allreduce", True) is False


def counted_here(p: nn.Parameter, rank: int, expert_group: ProcessGroup | None = None,
                 lowest: dict[int, int] | None = None) -> bool:
    """Whether global rank ``rank`` is the one holder of expert parameter ``p`` that counts it once for the whole
    model (the global gradient norm, a checkpoint that holds each logical expert once).

    ``p``'s holders are its groups: ``p.expert_dp_group`` (every rank, in every data-parallel copy, holding the
    same shard of that expert; ``expert_group`` instead, when given: a route's expert-DP group that spans the
    copies, as Megatron's) and, where a route tags one, ``p.large_ep_replica_group`` (its replicas inside one EP
    group). The counting rank is the lowest global rank of each of them; a parameter without groups is held by
    this rank alone. ``lowest`` caches each group's lowest rank between calls (keyed by ``id(group)``)."""
    lowest = {} if lowest is None else lowest
    for attr in (EXPERT_GROUP_ATTR, REPLICA_GROUP_ATTR):
        g = expert_group if (attr == EXPERT_GROUP_ATTR and expert_group is not None) else getattr(p, attr, None)
        if g is None or group_size(g) == 1:
            continue
        if id(g) not in lowest:
            lowest[id(g)] = min(dist.get_process_group_ranks(g))
        if lowest[id(g)] != rank:
            return False
    return True


def gradient_of(p: torch.nn.Parameter, *, main_grad: bool = False) -> torch.Tensor:
    """Where ``p``'s gradient lives: Megatron DDP's ``main_grad`` when ``main_grad`` and present, else ``.grad``,
    zero-filled when missing (a parameter that got no gradient on this rank still joins the collectives, so that
    every rank reduces the same tensors)."""
    if main_grad and getattr(p, "main_grad", None) is not None:
        return p.main_grad
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


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


def reduce_expert_gradients(
    params: Iterable[nn.Parameter], *, group: ProcessGroup | None = None, group_attr: str = EXPERT_GROUP_ATTR,
    main_grad: bool = False,
) -> int:
    """Sum the gradients of the expert parameters (``allreduce = False``) among ``params`` over their group.

    Args:
        params: any parameters; only expert parameters are touched.
        group: sum every expert parameter over this group (e.g. Megatron's expert-data-parallel group). None: each
            over the group in its attribute ``group_attr``; a parameter without one (or None) is alone: untouched.
        group_attr: the attribute that holds a parameter's group when ``group`` is None.
        main_grad: reduce ``param.main_grad`` where Megatron's DDP keeps one.
    Returns:
        the number of expert parameters reduced.

    One collective per group and dtype, in parameter order: every rank of a group holds the same experts in the
    same order (``rank_to_experts`` lists them ascending), so ranks that share several groups never wait on each
    other.
    """
    by_group: dict[int, tuple[ProcessGroup | None, list[torch.Tensor]]] = {}
    for p in params:
        if not (p.requires_grad and is_expert_param(p)):
            continue
        g = group if group is not None else getattr(p, group_attr, None)
        if g is None or group_size(g) == 1:
            continue
        by_group.setdefault(id(g), (g, []))[1].append(gradient_of(p, main_grad=main_grad))
    for g, grads in by_group.values():
        allreduce_flat(grads, g)
    return sum(len(grads) for _, grads in by_group.values())


def allreduce_gradients(
    params: Iterable[nn.Parameter] | nn.Module, group: ProcessGroup | None = None, average: bool = True, *,
    expert_group: ProcessGroup | None = None,
) -> int:
    """Reduce the gradients of a model's parameters as described in the module docstring.

    Args:
        params: a model or its parameters.
        group: the data-parallel group of the dense parameters (None: the world).
        average: divide every gradient, dense and expert, by the size of ``group``.
        expert_group: sum all expert gradients over this group (Megatron's expert-DP group); None: each over its
            own ``param.expert_dp_group``.
    Returns:
        the number of gradients reduced.

    Every rank must call this with the same model structure (the collectives follow parameter order).
    Trainable parameters without a gradient get a zero one (as DDP does), so the collectives always match.
    """
    if isinstance(params, nn.Module):
        params = params.parameters()
    params = [p for p in params if p.requires_grad]
    grads = [gradient_of(p) for p in params]
    world = group_size(group)
    dense = [g for p, g in zip(params, grads) if not is_expert_param(p)]
    if world > 1 and dense:
        allreduce_flat(dense, group)
    reduce_expert_gradients(params, group=expert_group)
    if average and world > 1:
        for g in grads:
            g.div_(world)
    return len(params)
