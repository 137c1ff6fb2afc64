"""Which experts each EP rank holds, checked once, and the slot table the dispatch reads every forward.

Shape legend:
    R  ranks in the EP group      E  experts      L  most experts one rank holds (1 unless colocated)

A *placement* (``placement/plan.py``) says which experts every rank of one EP group holds; the layer (core and
Megatron alike) needs it as ``rank_to_experts`` [R] and, when experts are colocated, as the slot table
``slot_RE[r, e]`` = the position of expert e among rank r's experts (-1: not there). Both are built here, once
per layer: the check is the same for every caller, and the table is a tensor that the layer keeps on its device.
"""
from __future__ import annotations

from typing import Any

import torch


def rank_to_experts_of(num_experts: int, ep_size: int, placement: Any, *, experts_field: str = "num_experts",
                       ep_what: str = "the EP group has {} ranks") -> tuple[tuple[int, ...], ...]:
    """The experts of every EP rank, checked against the EP group and the config.

    Args:
        num_experts: E of the layer's config.
        ep_size: R, ranks in the EP group.
        placement: None (expert r on rank r, which needs R == E), a ``Placement``, or any object with
            ``rank_to_experts`` ([R] tuples of expert ids) or only ``rank_to_expert`` ([R] ints, one per rank).
        experts_field, ep_what: how the caller names E and R, for the error messages (Megatron:
            ``num_moe_experts`` and "the expert-model-parallel size is {}").
    Returns:
        [R] tuples of expert ids, as the placement lists them.
    Raises:
        ValueError: the placement does not fit: wrong expert count or rank count, a rank with no expert, a
            duplicate or out-of-range id, or an expert on no rank.
    """
    if placement is None:
        if ep_size != num_experts:
            raise ValueError(
                f"{ep_what.format(ep_size)} but {experts_field}={num_experts}: without a placement each rank "
                "holds exactly one expert, so they must be equal (pass a placement from largeep_plugin.plan_placement "
                "for replicas, or plan_placement(..., allow_colocate=True) to put several experts on one rank)"
            )
        return tuple((r,) for r in range(num_experts))
    if getattr(placement, "num_experts", num_experts) != num_experts:
        raise ValueError(f"placement.num_experts={placement.num_experts} but {experts_field}={num_experts}")
    held = getattr(placement, "rank_to_experts", None)
    if held is None:  # a placement-like object with only the one-expert-per-rank view
        held = [(x,) if x >= 0 else () for x in placement.rank_to_expert]
    held = tuple(tuple(int(x) for x in h) for h in held)
    if len(held) != ep_size:
        raise ValueError(f"placement.rank_to_experts has {len(held)} entries but the EP group has {ep_size} ranks")
    bad = [r for r, h in enumerate(held) if not h or len(set(h)) != len(h) or any(not 0 <= x < num_experts for x in h)]
    missing = sorted(set(range(num_experts)) - {x for h in held for x in h})
    if bad or missing:
        problems = [f"EP rank {r} holds " + ("no expert" if not held[r] else f"expert {held[r][0]}" if len(held[r]) == 1
                                             else f"experts {held[r]}") for r in bad]
        if missing:
            problems.append(f"experts {missing} are on no rank")
        raise ValueError(f"placement.rank_to_experts={held}: {'; '.join(problems)} (every EP rank must hold at least "
                         f"one expert, distinct ids of 0..{num_experts - 1}, and every expert must be placed)")
    return held


def slot_table(rank_to_experts: tuple[tuple[int, ...], ...], num_experts: int) -> torch.Tensor:
    """``slot_RE`` int64 [R, E]: the slot of expert e on rank r (its index in ``rank_to_experts[r]``), -1 where
    rank r does not hold e. Built on the CPU; the layer registers it as a buffer so that it follows the layer's
    device, and the dispatch gathers ``slot_RE[dest_rank_TK, topk_ids_TK]`` without a host round trip."""
    slot_RE = torch.full((len(rank_to_experts), num_experts), -1, dtype=torch.int64)
    for r, held in enumerate(rank_to_experts):
        slot_RE[r, list(held)] = torch.arange(len(held))
    return slot_RE

