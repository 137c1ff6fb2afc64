"""The process groups of a placement: the only place in the plugin that creates process groups.

The world is ``dp`` copies of the placement (each copy a full set of its W ranks: replicas of the whole MoE
network are data-parallel). Copy i runs on the global ranks ``ep_ranks[i]``, by default the contiguous block
``[i * W, (i + 1) * W)``; placement rank p of copy i is global rank ``ep_ranks[i][p]``.

Groups, for the rank that builds them:
    ep_group          the W ranks of its copy: the group of the token all-to-alls.
    expert_tp_group   the t ranks that hold one replica of its expert between them (None when t = 1).
    expert_dp_groups  per expert the rank holds: every rank, in every copy, that holds the same shard of that
                      expert. Its gradients are reduced over this group (None when the rank is alone).
    replica_groups    per expert the rank holds: every rank holding any shard of it (equal to the expert-DP
                      group when t = 1, and then the same group object).

``torch.distributed.new_group`` must be called by every rank of the world, for every group, in the same order,
even for groups the rank is not in: ``build_process_groups`` walks all groups in one fixed order on every rank.
Groups of one rank are not created (None): there is nothing to reduce.

``build_replica_groups`` creates, per expert held more than once in one EP group, the group of its holders in that
group alone (for trainers whose data-parallel reduction already spans the copies, as Megatron's DDP does);
``ep_partition`` gathers every rank's EP group, the ``ep_ranks`` these builders take.

The gradients are reduced over these groups by ``grads.py``, nowhere else.

``build_node_groups`` creates the two subgroups of the node-batched dispatch (hierarchical.py): per EP group, one
*node group* per node (G consecutive EP ranks) and one *rail group* per local index (the ranks with that local
index on every node). Stage 1 of that dispatch only talks to the rail, stage 2 only to the node.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch.distributed as dist

from largeep_plugin.placement.plan import Placement
from largeep_plugin.placement.topology import as_int


@dataclass(frozen=True, kw_only=True)
class ExpertProcessGroups:
    """The groups one rank uses (see the module docstring). ``expert_dp_ranks`` and ``replica_ranks`` give the
    global ranks of each group, for logs and checks."""

    placement: Placement
    rank: int
    ep_ranks: tuple[int, ...]
    ep_group: dist.ProcessGroup
    expert_tp_group: dist.ProcessGroup | None
    expert_dp_groups: Mapping[int, dist.ProcessGroup | None]
    expert_dp_ranks: Mapping[int, tuple[int, ...]]
    replica_groups: Mapping[int, dist.ProcessGroup | None]
    replica_ranks: Mapping[int, tuple[int, ...]]

    @property
    def placement_rank(self) -> int:
        """This rank's index in its copy of the placement."""
        return self.ep_ranks.index(self.rank)

    @property
    def experts(self) -> tuple[int, ...]:
        """The experts this rank holds."""
        return self.placement.rank_to_experts[self.placement_rank]


def default_ep_ranks(placement: Placement, world_size: int) -> list[list[int]]:
    """Contiguous copies: copy i is global ranks [i * W, (i + 1) * W)."""
    w = placement.world_size
    if world_size % w:
        raise ValueError(f"world_size={world_size} is not a multiple of the placement's {w} ranks")
    return [list(range(i * w, (i + 1) * w)) for i in range(world_size // w)]


def build_process_groups(placement: Placement, *, ep_ranks: Sequence[Sequence[int]] | None = None,
                         backend: str | None = None) -> ExpertProcessGroups:
    """Create every group of ``placement`` (collectively: all ranks call this with the same arguments).

    Args:
        placement: the expert layout of one copy.
        ep_ranks: global ranks of each copy, [dp][W] (e.g. the groups of an existing expert-parallel layout);
            default: contiguous blocks.
        backend: backend of the new groups (default: the world's).
    """
    if not dist.is_initialized():
        raise RuntimeError("build_process_groups needs torch.distributed to be initialised")
    world, rank = dist.get_world_size(), dist.get_rank()
    copies = [list(c) for c in (ep_ranks if ep_ranks is not None else default_ep_ranks(placement, world))]
    flat = sorted(r for c in copies for r in c)
    if flat != list(range(world)) or any(len(c) != placement.world_size for c in copies):
        raise ValueError(f"ep_ranks must split the {world} ranks into copies of {placement.world_size}, "
                         f"got {copies}")
    mine = next(c for c in copies if rank in c)
    t = placement.expert_tp_degree

    def group(ranks: list[int]) -> dist.ProcessGroup | None:
        # every rank calls new_group for every group, in this one order; singletons are skipped by all alike
        return dist.new_group(sorted(ranks), backend=backend) if len(ranks) > 1 else None

    # step 1: one EP group per copy
    ep_group = None
    for c in copies:
        g = dist.new_group(sorted(c), backend=backend)
        if c is mine:
            ep_group = g
    # step 2: per expert, its replica group and (t > 1) one expert-DP group per shard
    held = placement.rank_to_experts[mine.index(rank)]
    replica_groups, replica_ranks, dp_groups, dp_ranks = {}, {}, {}, {}
    for x in range(placement.num_experts):
        reps = placement.replicas(x)
        everyone = [c[p] for c in copies for rep in reps for p in rep]
        g = group(everyone)
        shard_groups = [g] if t == 1 else [group([c[rep[j]] for c in copies for rep in reps]) for j in range(t)]
        if x in held:
            shard = next(rep.index(mine.index(rank)) for rep in reps if mine.index(rank) in rep)
            replica_groups[x], replica_ranks[x] = g, tuple(sorted(everyone))
            dp_groups[x] = shard_groups[shard]
            dp_ranks[x] = tuple(sorted(c[rep[shard]] for c in copies for rep in reps))
    # step 3: expert-TP groups, one per replica block in every copy
    tp_group = None
    if t > 1:
        for c in copies:
            for start in range(0, placement.world_size, t):
                g = group([c[p] for p in range(start, start + t)])
                if rank in [c[p] for p in range(start, start + t)]:
                    tp_group = g
    return ExpertProcessGroups(placement=placement, rank=rank, ep_ranks=tuple(mine), ep_group=ep_group,
                               expert_tp_group=tp_group, expert_dp_groups=dp_groups, expert_dp_ranks=dp_ranks,
                               replica_groups=replica_groups, replica_ranks=replica_ranks)


def ep_ranks_of(ep_group: dist.ProcessGroup | None) -> list[int]:
    """Global ranks of ``ep_group`` in group-rank order (the world, or [0] without torch.distributed)."""
    if not dist.is_available() or not dist.is_initialized():
        return [0]
    if ep_group is None:
        return list(range(dist.get_world_size()))
    return list(dist.get_process_group_ranks(ep_group))


def ep_partition(my_ep_ranks: list[int]) -> list[list[int]]:
    """Every rank's EP group, gathered from all ranks (collective): the data-parallel copies of the EP group."""
    everyone: list[list[int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, my_ep_ranks)
    copies = {tuple(c) for c in everyone if c is not None}
    return [list(c) for c in sorted(copies, key=min)]


def layer_expert_groups(placement: Placement | None, num_experts: int,
                        ep_group: dist.ProcessGroup | None) -> ExpertProcessGroups | None:
    """The groups a layer's expert gradients are summed over, built from the real EP groups (gathered from every
    rank; collective), or None when each expert is held once in the whole world (nothing to reduce). Decided alike
    on every rank. Build once and pass to every layer with the same layout: each call creates new groups."""
    my_ep_ranks = ep_ranks_of(ep_group)
    replicated = placement is not None and max(placement.num_replicas) > 1
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if not replicated and len(my_ep_ranks) == world:
        return None
    layout = placement if placement is not None else Placement.identity(num_experts)
    return build_process_groups(layout, ep_ranks=ep_partition(my_ep_ranks))


def build_replica_groups(rank_to_experts: Sequence[Sequence[int]], ep_ranks: Sequence[Sequence[int]], *,
                         backend: str | None = None) -> dict[int, dist.ProcessGroup | None]:
    """Per expert this rank holds: the group of the ranks *of its own EP group* that hold the same expert (None
    when it is held once there). Collective: every rank of the world calls it with the same arguments.

    Where ``build_process_groups`` sums replicas over every data-parallel copy at once (the core layer's
    convention), a trainer whose own data-parallel reduction already covers the copies (Megatron's DDP reduces
    every expert over its expert-DP group) needs the sum inside one copy only: these groups.

    Args:
        rank_to_experts: [R] the experts of every rank of one EP group (``expert_slots.rank_to_experts_of``).
        ep_ranks: global ranks of every EP group of the world, [dp][R] (``ep_partition``).
    """
    if not dist.is_initialized():
        raise RuntimeError("build_replica_groups needs torch.distributed to be initialised")
    rank = dist.get_rank()
    copies = [list(c) for c in ep_ranks]
    if any(len(c) != len(rank_to_experts) for c in copies):
        raise ValueError(f"ep_ranks={copies}: every EP group must have the {len(rank_to_experts)} ranks of "
                         "rank_to_experts")
    mine = next((c for c in copies if rank in c), None)
    if mine is None:
        raise ValueError(f"rank {rank} is in none of ep_ranks={copies}")
    held = rank_to_experts[mine.index(rank)]
    out: dict[int, dist.ProcessGroup | None] = {x: None for x in held}
    # One fixed order on every rank (new_group is collective): experts, then copies; groups of one are skipped.
    for x in sorted({x for h in rank_to_experts for x in h}):
        holders = [p for p, h in enumerate(rank_to_experts) if x in h]
        if len(holders) < 2:
            continue
        for c in copies:
            g = dist.new_group(sorted(c[p] for p in holders), backend=backend)
            if c is mine and x in held:
                out[x] = g
    return out


@dataclass(frozen=True, kw_only=True)
class NodeGroups:
    """This rank's node and rail groups (``build_node_groups``), for ``HierarchicalDispatcher``.

    Attributes:
        ep_ranks: global ranks of this rank's EP group, in EP-group order (sorted, as ``new_group`` orders them).
        ranks_per_node: G; EP rank i is on node i // G with local index i % G.
        node_group: the G ranks of this rank's node (stage 2).
        rail_group: the ranks with this rank's local index, one per node (stage 1).
        node_members, rail_members: EP-group ranks (not global ranks) of the two groups, in each group's own
            rank order, so a split list over the EP group converts to the subgroup's order by indexing.
    """

    ep_ranks: tuple[int, ...]
    ranks_per_node: int
    node_group: dist.ProcessGroup
    rail_group: dist.ProcessGroup
    node_members: tuple[int, ...]
    rail_members: tuple[int, ...]


def build_node_groups(ep_ranks: Sequence[int] | Sequence[Sequence[int]], ranks_per_node: int, *,
                      backend: str | None = None) -> NodeGroups:
    """Create the node and rail groups of every EP group (collectively: every rank of the world calls this with
    the same arguments, also ranks outside the EP groups given).

    Args:
        ep_ranks: global ranks of one EP group ([R]), or of every EP group of the world ([dp][R]); this rank must
            be in one of them.
        ranks_per_node: G consecutive EP ranks per node; must divide R and leave at least two nodes.
        backend: backend of the new groups (default: the world's).
    Returns:
        this rank's groups.
    """
    if not dist.is_initialized():
        raise RuntimeError("build_node_groups needs torch.distributed to be initialised")
    g = as_int(ranks_per_node)
    if g is None or g < 1:
        raise ValueError(f"ranks_per_node={ranks_per_node!r} must be an integer >= 1")
    nested = len(ep_ranks) > 0 and as_int(ep_ranks[0]) is None
    copies = [sorted(int(r) for r in c) for c in (ep_ranks if nested else [ep_ranks])]  # type: ignore[union-attr]
    world, rank = dist.get_world_size(), dist.get_rank()
    everyone = [r for c in copies for r in c]
    if not everyone or len(set(everyone)) != len(everyone) or not all(0 <= r < world for r in everyone):
        raise ValueError(f"ep_ranks={[list(c) for c in copies]} must be disjoint groups of ranks in [0, {world})")
    for c in copies:
        if len(c) % g or len(c) // g < 2:
            raise ValueError(f"ranks_per_node={g} must divide the EP group size {len(c)} into at least two nodes "
                             f"(ep_ranks={c})")
    mine = next((c for c in copies if rank in c), None)
    if mine is None:
        raise ValueError(f"rank {rank} is in none of ep_ranks={copies}")
    found: dict[str, tuple[dist.ProcessGroup, tuple[int, ...]]] = {}
    # One fixed order on every rank: per EP group, the nodes, then the rails (new_group is collective).
    for c in copies:
        n = len(c) // g
        subsets = [("node", list(range(m * g, (m + 1) * g))) for m in range(n)]
        subsets += [("rail", list(range(l, len(c), g))) for l in range(g)]
        for kind, members in subsets:
            # members ascend, so the group's rank order (sorted global ranks) is the members' order
            grp = dist.new_group([c[i] for i in members], backend=backend)
            if c is mine and mine.index(rank) in members:
                found[kind] = (grp, tuple(members))
    return NodeGroups(ep_ranks=tuple(mine), ranks_per_node=g, node_group=found["node"][0],
                      rail_group=found["rail"][0], node_members=found["node"][1], rail_members=found["rail"][1])
