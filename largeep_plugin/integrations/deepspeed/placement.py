"""The ``"large_ep"`` section's placement and node layout under DeepSpeed.

Shape legend:
    E  experts (= ranks of one EP group: one expert per rank)      W  ranks the topology describes

``placement.topology_file`` (and optionally ``placement.load_file``, tokens per expert) give a topology-aware
permutation of the experts over the ranks of each EP group: ``plan_section_placement`` (``integrations/section/placement.py``,
shared with the Megatron-LM route) plans it once, with the same inputs on every rank, so every rank gets the same
plan without communicating. Every EP group (every
data-parallel copy) uses the same permutation, so the ranks with one EP rank in all copies still hold one
expert: DeepSpeed's expert-data-parallel gradient reduction stays right.

Replicated placements (a topology with more GPUs than experts) are refused: DeepSpeed reduces expert gradients
only over its expert-data-parallel group (the same EP rank in every copy), while replicas of an expert inside
one EP group must also *sum* their gradients over their replica group, between backward and step. Under ZeRO 1
and 2 the engine averages and partitions gradients inside its own reduction (bucketed reduce-scatter as the
backward runs), so that sum would have to go into the engine's reduction itself; not done yet.

DeepSpeed names per-expert checkpoint files by ``EP rank * local experts + local id``. With a permutation the
rank at EP rank r holds expert ``rank_to_expert[r]``: ``expert_ids_in_checkpoints`` makes the engine's save and
load use the expert id instead, so file ``layer_<l>_expert_<e>`` always holds expert e (a stock checkpoint loads
expert e onto the rank that holds e).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Mapping

import torch.distributed as dist
from deepspeed.utils import groups

from largeep_plugin.placement.plan import Placement
from largeep_plugin.layer.process_groups import ExpertProcessGroups
from largeep_plugin.placement.topology import Topology
from largeep_plugin.integrations.section.config import SECTION, LargeEPSection
from largeep_plugin.integrations.section.placement import plan_section_placement, read_load_file

__all__ = ["plan_section_placement", "read_load_file", "resolve_ranks_per_node", "deepspeed_expert_groups",
           "expert_ids_in_checkpoints", "hook_checkpoint_names"]


def _topology_ranks_per_node(topology: Topology) -> int:
    sizes = sorted({n.num_gpus for n in topology.nodes})
    if len(sizes) != 1:
        raise NotImplementedError(
            f"dispatch='hierarchical' needs nodes of one size, but the placement's topology has nodes of {sizes} GPUs"
        )
    return sizes[0]


def resolve_ranks_per_node(section: LargeEPSection, placement: Placement | None,
                           environ: Mapping[str, str] | None = None) -> int | None:
    """Ranks of one node for the layers' dispatcher: ``overlap.ranks_per_node`` when set, else the placement's
    topology, else ``LOCAL_WORLD_SIZE`` (set by torchrun and the deepspeed launcher). None with flat dispatch
    and no explicit value. The value must divide ``ep_size``, and hierarchical dispatch needs two nodes or more."""
    env = os.environ if environ is None else environ
    explicit = section.overlap.ranks_per_node
    hierarchical = section.overlap.dispatch == "hierarchical"
    key = f"{SECTION}.overlap.ranks_per_node"
    if explicit is not None:
        value, source = explicit, f"{key}={explicit}"
        if placement is not None and hierarchical and _topology_ranks_per_node(placement.topology) != explicit:
            raise ValueError(f"{key}={explicit} but the placement's topology has "
                             f"{_topology_ranks_per_node(placement.topology)} GPUs per node")
    elif not hierarchical:
        return None
    elif placement is not None:
        value = _topology_ranks_per_node(placement.topology)
        source = f"{SECTION}.placement.topology_file (nodes of {value} GPUs)"
    elif env.get("LOCAL_WORLD_SIZE"):
        raw = env["LOCAL_WORLD_SIZE"]
        if not raw.strip().isdigit() or int(raw) < 1:
            raise ValueError(f"LOCAL_WORLD_SIZE={raw!r} is not a positive integer (it gives {key} by default)")
        value, source = int(raw), f"LOCAL_WORLD_SIZE={raw}"
    else:
        raise ValueError(
            f"{SECTION}.overlap.dispatch='hierarchical' needs the ranks of one node: set {key}, give "
            f"{SECTION}.placement.topology_file, or run under a launcher that sets LOCAL_WORLD_SIZE"
        )
    ep = section.ep_size
    if ep is not None and ep % value:
        raise ValueError(f"{source} does not divide {SECTION}.ep_size={ep}: nodes must hold whole blocks of "
                         "consecutive EP ranks")
    if hierarchical and ep is not None and ep // value < 2:
        raise ValueError(f"{source} puts all {ep} EP ranks on one node: dispatch='hierarchical' needs two nodes "
                         f"or more (use \"flat\")")
    return value


def deepspeed_expert_groups(placement: Placement, ep_group: dist.ProcessGroup, group_name: str) -> ExpertProcessGroups:
    """The layers' view of DeepSpeed's groups for a placement with one copy of every expert (one expert per rank,
    or several when colocated): the EP group, and as the data-parallel group of each expert this rank holds
    DeepSpeed's expert-data-parallel group (the same EP rank, hence the same experts, in every copy). Passing it to
    ``LargeEPMoE`` avoids building a second set of groups."""
    rank = dist.get_rank()
    ep_ranks = tuple(dist.get_process_group_ranks(ep_group))
    held = placement.rank_to_experts[ep_ranks.index(rank)]
    edp = groups._get_expert_data_parallel_group(group_name)
    edp_ranks = tuple(sorted(dist.get_process_group_ranks(edp)))
    edp_group = edp if len(edp_ranks) > 1 else None
    return ExpertProcessGroups(
        placement=placement, rank=rank, ep_ranks=ep_ranks, ep_group=ep_group, expert_tp_group=None,
        expert_dp_groups={e: edp_group for e in held}, expert_dp_ranks={e: edp_ranks for e in held},
        replica_groups={e: edp_group for e in held}, replica_ranks={e: edp_ranks for e in held},
    )


@contextlib.contextmanager
def expert_ids_in_checkpoints(group_name: str, expert_id: int) -> Iterator[None]:
    """While the engine saves or loads a checkpoint, answer its question "EP rank in ``group_name``" with the
    expert this rank holds: the engine names per-expert files (and its expert optimizer files) by
    ``EP rank * local experts + local id``, which is the expert id only for the identity placement. The engine
    looks the function up on ``deepspeed.utils.groups`` at call time and cannot be subclassed (it is built inside
    ``deepspeed.initialize``), so it is replaced for the duration of the call only."""
    original = groups._get_expert_parallel_rank

    def expert_parallel_rank(name: str) -> int:
        return expert_id if name == group_name else original(name)

    groups._get_expert_parallel_rank = expert_parallel_rank
    try:
        yield
    finally:
        groups._get_expert_parallel_rank = original


def hook_checkpoint_names(engine: Any, group_name: str, expert_id: int) -> None:
    """Wrap ``engine.save_checkpoint`` and ``engine.load_checkpoint`` in ``expert_ids_in_checkpoints``."""
    for method in ("save_checkpoint", "load_checkpoint"):
        inner = getattr(engine, method)

        def wrapped(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
            with expert_ids_in_checkpoints(group_name, expert_id):
                return _inner(*args, **kwargs)

        setattr(engine, method, wrapped)
