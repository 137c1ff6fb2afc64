"""Timing a phase as each rank's own device would take it, on ranks that share a few cores.

On a machine with fewer cores than ranks, a rank waiting for the busiest one hands its core to it, so a step's
wall clock hides the imbalance a cluster (one GPU per rank) would pay for. ``exclusive_seconds`` runs a phase on
the ranks *one at a time*, in rank order, a barrier between turns: while rank r computes, the others wait in the
barrier (a blocking wait, not a spin), so r has a core to itself and its time is its own. The phase's time on a
cluster is then the slowest rank's (``max``), and a step's critical path the sum over phases of the slowest
rank's time, plus the communication.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.distributed as dist


def exclusive_seconds(fn: Callable[[], Any], group: Any = None, *, repeats: int = 1) -> list[float]:
    """Run ``fn()`` ``repeats`` times on every rank of ``group``, one rank at a time; returns every rank's best time
    (seconds, in group rank order; the same list on every rank). ``fn`` must not communicate."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats!r} must be >= 1")
    size = dist.get_world_size(group) if dist.is_initialized() else 1
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    mine = float("inf")
    for turn in range(size):
        if turn == rank:
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                mine = min(mine, time.perf_counter() - start)
        if size > 1:
            dist.barrier(group=group)
    if size == 1:
        return [mine]
    every = torch.zeros(size, dtype=torch.float64)
    every[rank] = mine
    dist.all_reduce(every, group=group)
    return every.tolist()
