"""Training a converted model with plain PyTorch (torchrun, no DeepSpeed or Megatron): the groups and DDP.

The world is ``copies`` data-parallel copies of one EP group of ``ep_size`` ranks (world = ep_size x copies,
contiguous: copy i is global ranks [i * ep_size, (i + 1) * ep_size)). Every rank feeds its own tokens; each rank's
loss is the mean over its tokens, the gradient wanted that of the mean over the world.

    groups = parallel_groups(ep_size)                       # ep_group, dp_group (None, None with one copy)
    model = convert_model(model, groups.ep_group)

Dense parameters (attention, embeddings, norms, the router, shared experts) are the same on every rank of the
world; expert parameters differ per rank (each holds its experts) and carry ``allreduce = False``
(``largeep_plugin.layer.grads``). Two ways to reduce the gradients after backward:

    (a) no wrapper           ``allreduce_gradients(model)``: dense averaged over the world, each expert summed over
                             its expert-data-parallel group (its holders in every copy) and divided by the world.
    (b) torch DDP            ``ddp = wrap_ddp(model)``: DDP averages the dense gradients during backward (bucketed,
                             overlapped) and ignores the expert parameters by name
                             (``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``); after
                             backward ``allreduce_gradients(expert_parameters(model))`` reduces the experts alone.

Either way, after ``optimizer.step()``: ``update_expert_biases(model, groups.dp_group)`` (the counts summed over the
copies, so that every copy applies one bias update).

What DDP must not touch, and why (``ddp_ignored_names``):
    * expert parameters: DDP would broadcast rank 0's experts over every rank at construction (all experts would
      become expert 0) and average different experts' gradients over the world;
    * the layers' non-persistent buffers (the token counts since the last bias update, the global-batch counts,
      the slot table): run-time bookkeeping of one EP group. The counts differ between copies, and DDP broadcasts
      rank 0's buffers before every forward that follows a synchronised one: with gradients accumulated without
      ``no_sync``, or a bias updated every few steps, a copy's counts would be replaced by rank 0's;
    * the clone slots of dynamic replicas (``clones.*``): the clones' weights differ per rank, and the load history
      and plan (saved, kept on the host) belong to one EP group: each copy plans from its own load.
The balancing bias ``router.expert_bias`` (persistent) stays in DDP's broadcast: every rank updates it identically
from the same global counts, so the broadcast changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from largeep_plugin.layer.comm import ProcessGroup, group_rank, group_size
from largeep_plugin.layer.grads import is_expert_param
from largeep_plugin.layer.moe_layer import moe_layers
from largeep_plugin.layer.process_groups import build_process_groups
from largeep_plugin.placement.plan import Placement


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's groups for ``copies`` data-parallel copies of an EP group of ``ep_size`` ranks.

    Attributes:
        ep_group: the ranks of this rank's copy (the token all-to-alls; ``convert_model``'s ``ep_group``); None
            with one copy: the default group.
        dp_group: the ranks holding this EP rank in every copy (``update_expert_biases``'s ``dp_group``); None with
            one copy.
        ep_size, copies: world = ep_size x copies.
        ep_rank, copy: this rank's place: global rank = copy * ep_size + ep_rank.
    """

    ep_group: ProcessGroup | None
    dp_group: ProcessGroup | None
    ep_size: int
    copies: int
    ep_rank: int
    copy: int


def parallel_groups(ep_size: int | None = None) -> ParallelGroups:
    """The EP and data-parallel groups of this rank (collective: every rank calls it with the same ``ep_size``).

    Args:
        ep_size: ranks per EP group (None: the world, one copy); must divide the world size.
    Raises:
        ValueError: ``ep_size`` < 1 or not a divisor of the world size.
    """
    world, rank = group_size(None), group_rank(None)
    size = world if ep_size is None else ep_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"ep_size={ep_size!r} must be an integer >= 1")
    if world % size:
        raise ValueError(f"ep_size={size} does not divide the world size {world}: the world is ep_size x "
                         "data-parallel copies")
    if size == world:
        return ParallelGroups(ep_group=None, dp_group=None, ep_size=size, copies=1, ep_rank=rank, copy=0)
    # The identity layout of ep_size slots: its "expert p" is EP rank p, so its expert-data-parallel group of p is
    # the ranks holding EP rank p in every copy. process_groups.py creates every group, in one order on all ranks.
    groups = build_process_groups(Placement.identity(size))
    ep_rank = groups.placement_rank
    return ParallelGroups(ep_group=groups.ep_group, dp_group=groups.expert_dp_groups[ep_rank], ep_size=size,
                          copies=world // size, ep_rank=ep_rank, copy=rank // size)


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of this rank's experts (``allreduce = False``), in model order."""
    return [p for p in model.parameters() if is_expert_param(p)]


def ddp_ignored_names(model: nn.Module) -> list[str]:
    """Qualified names (relative to ``model``) of what DDP must leave alone: the expert parameters and the large-EP
    layers' non-persistent buffers (module docstring)."""
    names = [name for name, p in model.named_parameters() if is_expert_param(p)]
    for prefix, layer in moe_layers(model):
        persistent = set(layer.state_dict())
        names += [f"{prefix}.{name}" if prefix else name for name, _ in layer.named_buffers()
                  if name not in persistent or name.startswith("clones.")]
    return names


def wrap_ddp(model: nn.Module, **ddp_kwargs: object) -> DistributedDataParallel:
    """``DistributedDataParallel(model, **ddp_kwargs)`` over the dense parameters only.

    DDP reads ``model._ddp_params_and_buffers_to_ignore`` (set by its static
    ``_set_params_and_buffers_to_ignore_for_model``, torch 2.x) when it is built: the names listed there are left
    out of its gradient buckets, of the parameter and buffer broadcast at construction and of the buffer broadcast
    before each forward. After backward, reduce the experts with
    ``allreduce_gradients(expert_parameters(model))``. ``ddp_kwargs`` go to DDP (``device_ids``,
    ``process_group``: the world by default, since every rank holds the same dense parameters).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("wrap_ddp needs torch.distributed to be initialised")
    setter = getattr(DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model", None)
    if setter is None:  # present in torch 1.8 to 2.13; a torch without it would silently average the experts
        raise NotImplementedError("this torch's DistributedDataParallel has no "
                                  "_set_params_and_buffers_to_ignore_for_model: use recipe (a), "
                                  "allreduce_gradients(model) without DDP")
    setter(model, ddp_ignored_names(model))
    return DistributedDataParallel(model, **ddp_kwargs)


def unconverted_ndim(p: nn.Parameter) -> int:
    """How many dimensions the Hugging Face tensor ``p`` was read from has: one more than ``p`` for an expert's
    tensor (a row of the fused ``[E, ...]`` tensors: gpt-oss's expert biases are ``[E, 2F]`` and ``[E, H]`` there,
    ``[2F]`` and ``[H]`` here), the same for every other parameter."""
    return p.dim() + 1 if is_expert_param(p) else p.dim()


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The two optimizer parameter groups of the common recipe "no weight decay for tensors of fewer than two
    dimensions", decided on the unconverted model's tensors (``unconverted_ndim``), so that a converted model
    decays exactly what the unconverted one would: ``[{"params": decayed, "weight_decay": weight_decay},
    {"params": the rest, "weight_decay": 0.0}]``, in model order. (``p.ndim < 2`` on the converted model would also
    leave gpt-oss's expert biases undecayed. Rules by name, such as transformers' "bias" and norm patterns, need
    nothing: the converted names keep "bias" and "norm" where the Hugging Face ones have them.)"""
    if not (isinstance(weight_decay, (int, float)) and not isinstance(weight_decay, bool) and weight_decay >= 0):
        raise ValueError(f"weight_decay={weight_decay!r}: must be a number >= 0")
    decayed, rest = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decayed if unconverted_ndim(p) >= 2 else rest).append(p)
    return [{"params": decayed, "weight_decay": float(weight_decay)}, {"params": rest, "weight_decay": 0.0}]
