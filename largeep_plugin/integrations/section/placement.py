"""The ``"large_ep"`` section's placement files -> a ``Placement``, shared by the DeepSpeed adapter and the
Megatron-LM route (it imports neither framework).

Shape legend:
    E  experts (= ranks of one EP group: one expert per rank)

``placement.topology_file`` (and optionally ``placement.load_file``, tokens per expert) give a topology-aware
permutation of the experts over the ranks of one EP group. ``plan_section_placement`` is pure: the same inputs give
the same plan on every rank, without communicating.
"""
from __future__ import annotations

import json

from largeep_plugin.placement.plan import Placement, plan_placement
from largeep_plugin.placement.topology import load_topology
from .config import SECTION, LargeEPSection


def read_load_file(path: str, num_experts: int) -> list[float]:
    """Tokens per expert from ``path``: a JSON list of E numbers or ``{"tokens_per_expert": [E numbers]}``
    (docs/placement.md; ``largeep demo --record-load`` writes it)."""
    where = f"{SECTION}.placement.load_file={path!r}"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{where} cannot be read: {e}") from e
    if isinstance(data, dict):
        if set(data) != {"tokens_per_expert"}:
            raise ValueError(f"{where}: expected a list or {{\"tokens_per_expert\": [...]}}, got keys {sorted(data)}")
        data = data["tokens_per_expert"]
    if not isinstance(data, list) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in data):
        raise ValueError(f"{where}: tokens_per_expert must be a JSON list of numbers")
    if len(data) != num_experts:
        raise ValueError(f"{where} has {len(data)} entries but the MoE layers have {num_experts} experts")
    return [float(v) for v in data]


def plan_section_placement(section: LargeEPSection, num_experts: int, top_k: int) -> Placement | None:
    """The placement of ``section`` (None when it names no topology file), planned for ``num_experts`` experts
    over one EP group of ``section.ep_size`` ranks. Pure: the same inputs give the same plan on every rank."""
    files = section.placement
    if files.topology_file is None:
        if files.load_file is not None:
            raise ValueError(f"{SECTION}.placement.load_file={files.load_file!r} needs "
                             f"{SECTION}.placement.topology_file: the plan places experts on a topology")
        return None
    try:
        topology = load_topology(files.topology_file)
    except OSError as e:
        raise ValueError(f"{SECTION}.placement.topology_file={files.topology_file!r} cannot be read: {e}") from e
    w = topology.world_size
    if w < section.ep_size:
        raise ValueError(f"{SECTION}.placement.topology_file={files.topology_file!r} describes {w} GPUs but "
                         f"{SECTION}.ep_size={section.ep_size}: the topology is that of one expert-parallel group")
    if w > num_experts:
        raise NotImplementedError(
            f"{SECTION}.placement.topology_file={files.topology_file!r} describes {w} GPUs for {num_experts} "
            "experts, which replicates experts: not supported under DeepSpeed yet, because its engine reduces "
            "expert gradients only over its expert-data-parallel group, and the replicas of an expert would also "
            "have to sum their gradients over their replica group inside the engine's (ZeRO-partitioned) "
            "reduction. Give a topology of ep_size GPUs (one expert per GPU)"
        )
    load = read_load_file(files.load_file, num_experts) if files.load_file is not None else None
    placement = plan_placement(num_experts, topology, load=load, top_k=top_k)
    if max(placement.num_replicas) > 1 or placement.expert_tp_degree != 1:
        raise NotImplementedError("the planned placement replicates or splits experts: not supported under DeepSpeed")
    return placement
