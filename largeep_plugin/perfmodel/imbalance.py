"""Load imbalance from a measured routing load: tokens on the busiest EP rank over the mean.

A load file is JSON, one of:
    [120, 98, 143, ...]                                  tokens per expert [E]
    {"tokens_per_expert": [120, 98, ...]}                the same, as written by `largeep demo` / `plan`
    {"tokens_per_expert": [[...], [...], ...]}           one row [E] per MoE layer
Experts sit on ranks in contiguous blocks (expert e on rank e // (E / ep)); when ep > E each expert has ep / E
replicas that share its load evenly. A step's MoE time grows linearly with each layer's imbalance, so several
layers are combined by their mean.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from largeep_plugin.placement.files import read_json


def rank_imbalance(tokens_per_expert: Sequence[float], ep: int) -> float:
    """max / mean of the tokens per rank when E experts are spread over `ep` ranks (see the module doc)."""
    load = [float(x) for x in tokens_per_expert]
    e = len(load)
    if e == 0:
        raise ValueError("tokens_per_expert is empty")
    if any(not math.isfinite(x) or x < 0 for x in load):
        raise ValueError(f"tokens_per_expert must hold finite counts >= 0, got {load}")
    if ep < 1 or (e % ep and ep % e):
        raise ValueError(f"ep={ep} and the {e} experts of the load must divide one another")
    if sum(load) <= 0:
        raise ValueError("tokens_per_expert sums to 0: no routed tokens to measure an imbalance from")
    if ep <= e:
        per = e // ep
        ranks = [sum(load[r * per:(r + 1) * per]) for r in range(ep)]
    else:
        replicas = ep // e
        ranks = [load[r // replicas] / replicas for r in range(ep)]
    mean = sum(ranks) / len(ranks)
    return max(ranks) / mean


def read_load_file(path: str | Path, num_experts: int) -> list[list[float]]:
    """Rows of tokens per expert (one per layer) from a load file; ValueError if the shape is wrong."""
    data: Any = read_json(path)
    if isinstance(data, dict):
        if "tokens_per_expert" not in data:
            raise ValueError(f"load file {path}: expected a list or a mapping with 'tokens_per_expert', got keys "
                             f"{sorted(data)}")
        data = data["tokens_per_expert"]
    if not isinstance(data, list) or not data:
        raise ValueError(f"load file {path}: tokens_per_expert must be a non-empty list")
    rows = data if isinstance(data[0], list) else [data]
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != num_experts:
            raise ValueError(f"load file {path}: row {i} has {len(row) if isinstance(row, list) else '?'} entries, "
                             f"the model has num_experts={num_experts}")
    return [[float(x) for x in row] for row in rows]


def imbalance_from_load(path: str | Path, num_experts: int, ep: int) -> float:
    """Mean over layers of the per-layer rank imbalance of the load in `path` at expert-parallel size ep."""
    rows = read_load_file(path, num_experts)
    return sum(rank_imbalance(r, ep) for r in rows) / len(rows)
