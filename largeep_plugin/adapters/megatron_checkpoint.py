"""Distributed-checkpoint layout of the large-EP experts: every expert under its *global* expert id.

Megatron's distributed checkpoint stores ``ShardedTensor`` s: a key, this rank's piece of a global tensor, and the
piece's offset in it. The expert of EP rank r is saved as the slice ``[e]`` of global tensors of shape
``[(layers,) E, ...]`` (the layer axis comes from Megatron's block when the layers are stacked), under

    <layer prefix>mlp.experts.expert.fc1.weight     global [(L,) E, F or 2F, H],  this rank: index e = its expert id
    <layer prefix>mlp.experts.expert.fc2.weight     global [(L,) E, H, F]
    (+ .bias entries with linear_bias)

so the file does not depend on which rank held which expert: a model built with another EP size (or another
placement) asks for the slices of the experts it holds and gets them. Ranks that hold a copy of the same expert
(the expert-data-parallel group, or replicas inside the EP group under a placement) have distinct
``replica_id`` s and only the main replica ``(0, 0, 0)`` is written. The router (``mlp.router.weight``,
``mlp.router.expert_bias``) is replicated and saved by Megatron's defaults.

What the layout allows today: any EP size whose ranks each hold one expert, i.e. EP = E with placement None, or
EP > E with a placement that replicates experts. Loading E experts into fewer than E ranks needs a rank to hold
several experts, which the core layer does not do (one expert per rank).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from megatron.core.dist_checkpointing.mapping import ShardedTensor


def replica_index(rank_to_expert: Sequence[int], rank: int) -> int:
    """How many lower EP ranks hold the same expert as ``rank`` (0 for the first holder)."""
    expert = rank_to_expert[rank]
    return sum(1 for r in range(rank) if rank_to_expert[r] == expert)


def expert_sharded_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    prefix: str,
    sharded_offsets: Sequence[tuple[int, int, int]],
    *,
    expert_id: int,
    num_experts: int,
    replica_id: tuple[int, int, int],
) -> dict[str, Any]:
    """Wrap one expert's tensors as slices of global per-expert tensors.

    Args:
        state_dict: the expert's tensors (``keep_vars=True`` so the optimizer state can be sharded alike).
        prefix: key prefix, e.g. ``"decoder.layers.0.mlp.experts.expert."``.
        sharded_offsets: the offsets Megatron's modules above already applied (e.g. the layer axis).
        expert_id: the expert's global id e (its index on the new axis).
        num_experts: E (the size of the new axis).
        replica_id: (0, replica inside the EP group, rank in the expert-data-parallel group).
    Returns:
        ``{state dict key: ShardedTensor}``; the checkpoint key equals the state dict key.
    """
    axis = len(sharded_offsets)
    out: dict[str, Any] = {}
    for name, tensor in state_dict.items():
        key = f"{prefix}{name}"
        out[key] = ShardedTensor.from_rank_offsets(
            key,
            tensor,
            *sharded_offsets,
            (axis, expert_id, num_experts),
            replica_id=replica_id,
            prepend_axis_num=axis + 1,
        )
    return out
