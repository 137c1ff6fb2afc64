"""Distributed-checkpoint layout of the large-EP experts: every expert under its *global* expert id.

Megatron's distributed checkpoint stores ``ShardedTensor`` s: a key, this rank's piece of a global tensor, and the
piece's offset in it. The expert of EP rank r is saved as the slice ``[e]`` of global tensors of shape
``[(layers,) E, ...]`` (the layer axis comes from Megatron's block when the layers are stacked), under

    <layer prefix>mlp.experts.expert.fc1.weight     global [(L,) E, F or 2F, H],  this rank: index e = its expert id
    <layer prefix>mlp.experts.expert.fc2.weight     global [(L,) E, H, F]
    (+ .bias entries with linear_bias)

so the file does not depend on which rank held which expert: a model built with another EP size (or another
placement) asks for the slices of the experts it holds and gets them. A rank that holds several experts
(a colocated placement: state-dict keys ``mlp.experts.local_experts.<slot>.fc1.weight``) gives one slice per expert,
all under the same checkpoint key ``mlp.experts.expert.fc1.weight``, so EP = E, EP < E (colocated) and EP > E
(replicated) read and write one layout. Ranks that hold a copy of the same expert (the expert-data-parallel group,
or replicas inside the EP group under a placement) have distinct ``replica_id`` s and only the main replica
``(0, 0, 0)`` is written. The router (``mlp.router.weight``, ``mlp.router.expert_bias``) is replicated and saved by
Megatron's defaults.

The optimizer state follows the same keys wherever Megatron's optimizer builds it from the model's sharded state
dict, parameter by parameter: ``FP32Optimizer`` / ``Float16OptimizerWithFloat16Params``
(``optimizer.state.<exp_avg|exp_avg_sq|fp32_param>.<model key>``, the expert's slice) and the distributed
optimizer with ``distrib_optim_sharding_type`` ``'fully_sharded_model_space'`` (mcore 0.16's default) or
``'fully_reshardable'``. Its other formats, ``'dp_reshardable'`` and ``'dp_zero_gather_scatter'``, store the flat
buffers of each data-parallel group, laid out by which experts the rank held: with them every layer also stores its
layout (``<prefix>large_ep_layout``, a ``ShardedObject``), and loading it into another layout is refused
(``check_layout``) rather than giving the slots the moments of other experts.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.transformer.utils import make_sharded_object_for_checkpoint

# Distributed-optimizer checkpoint formats whose state is stored per data-parallel buffer, not per parameter.
BUCKET_FORMATS = ("dp_reshardable", "dp_zero_gather_scatter")
LAYOUT_KEY = "large_ep_layout"


def replica_index(rank_to_experts: Sequence[Sequence[int]], rank: int, expert: int) -> int:
    """How many lower EP ranks hold ``expert`` too (0 for its first holder); ``rank_to_experts[r]`` lists the
    experts of EP rank r."""
    return sum(1 for r in range(rank) if expert in rank_to_experts[r])


def expert_sharded_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    prefix: str,
    sharded_offsets: Sequence[tuple[int, int, int]],
    *,
    expert_id: int,
    num_experts: int,
    replica_id: tuple[int, int, int],
    checkpoint_prefix: str | None = None,
) -> dict[str, Any]:
    """Wrap one expert's tensors as slices of global per-expert tensors.

    Args:
        state_dict: the expert's tensors (``keep_vars=True`` so the optimizer state can be sharded alike).
        prefix: key prefix, e.g. ``"decoder.layers.0.mlp.experts.expert."``.
        sharded_offsets: the offsets Megatron's modules above already applied (e.g. the layer axis).
        expert_id: the expert's global id e (its index on the new axis).
        num_experts: E (the size of the new axis).
        replica_id: (0, replica inside the EP group, rank in the expert-data-parallel group).
        checkpoint_prefix: key prefix in the checkpoint when it differs from the state dict's (a colocated rank's
            ``...experts.local_experts.<slot>.`` is stored as ``...experts.expert.``); None: ``prefix``.
    Returns:
        ``{state dict key: ShardedTensor}``; the checkpoint key is the state dict key with ``checkpoint_prefix``.
    """
    checkpoint_prefix = prefix if checkpoint_prefix is None else checkpoint_prefix
    axis = len(sharded_offsets)
    out: dict[str, Any] = {}
    for name, tensor in state_dict.items():
        out[f"{prefix}{name}"] = ShardedTensor.from_rank_offsets(
            f"{checkpoint_prefix}{name}",
            tensor,
            *sharded_offsets,
            (axis, expert_id, num_experts),
            replica_id=replica_id,
            prepend_axis_num=axis + 1,
        )
    return out


def layout_sharded_object(prefix: str, sharded_offsets: Sequence[tuple[int, int, int]], *, sharding_type: str,
                          home: Sequence[Sequence[int]], replica_id: tuple[int, int, int]) -> ShardedObject:
    """The layer's layout as a ``ShardedObject`` under ``<prefix>large_ep_layout`` (one per layer: the layer axis
    of ``sharded_offsets`` is its offset): ``{"sharding_type", "ep_size", "home"}``, ``home`` [R] the experts of
    every EP rank."""
    layout = {"sharding_type": sharding_type, "ep_size": len(home), "home": [list(h) for h in home]}
    return make_sharded_object_for_checkpoint(layout, f"{prefix}{LAYOUT_KEY}", tuple(sharded_offsets),
                                              replica_id=replica_id)


def check_layout(saved: Mapping[str, Any], home: Sequence[Sequence[int]], where: str) -> None:
    """Refuse to load a checkpoint whose optimizer state is stored per data-parallel buffer (``saved``: what
    ``layout_sharded_object`` stored) into another layout ``home`` (NotImplementedError naming both)."""
    now = [list(h) for h in home]
    if saved["home"] == now:
        return
    raise NotImplementedError(
        f"{where}: the checkpoint was saved with distrib_optim_sharding_type={saved['sharding_type']!r} at EP size "
        f"{saved['ep_size']} with experts per EP rank {saved['home']}, and this model runs EP size {len(now)} with "
        f"{now}: that format stores the distributed optimizer's flat buffers of each data-parallel group, laid out by "
        "the experts a rank held, so the moments would land on other experts. Resume it with the layout it was "
        "saved with, or save with distrib_optim_sharding_type='fully_sharded_model_space' or 'fully_reshardable' "
        "(state per parameter, stored by the expert's global id) to resume at another EP size or layout"
    )
