"""Placement that honours routing groups: every routing group on one node, replicas included.

Group-limited routing (``LargeEPConfig(num_groups=G, group_topk=M)``) lets a token choose experts in at most M
groups. A group is worth something to the network only if its experts share a node: then a token reaches at most M
nodes, whichever experts (and replicas) it picks. ``plan_placement(..., expert_groups=G)`` plans so:

1. groups to nodes: by decreasing load, each group to the node with the least load per GPU slot that still has
   room (a node takes a group while it has a slot for one copy of each of its experts; colocated: its share of
   the groups), so every node gets groups and the load is balanced across nodes;
2. inside each node, the placement planner's own rules on the node's experts only: one replica per expert and the
   spare slots to the hottest (``search.replica_counts``), or, colocated, balanced bins (``search.colocated_bins``).

Expert e is in routing group e // (E / G), as in the router. ``max_nodes_per_token`` reports how many nodes one
token may reach under a placement (for any placement, grouped or not).
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

import torch

from . import search


def check_expert_groups(num_experts: int, expert_groups: int) -> int:
    """The group size E / G; ValueError naming the value unless G is an integer >= 1 dividing E."""
    if isinstance(expert_groups, bool) or not isinstance(expert_groups, int) or expert_groups < 1:
        raise ValueError(f"expert_groups={expert_groups!r} must be an integer >= 1")
    if num_experts % expert_groups:
        raise ValueError(f"expert_groups={expert_groups} does not divide num_experts={num_experts}")
    return num_experts // expert_groups


def nodes_of_groups(load_E: torch.Tensor, expert_groups: int, units_per_node: Sequence[int],
                    colocate: bool) -> list[int]:
    """Step 1: the node of each routing group [G].

    Args:
        load_E: float64 [E] tokens per expert.
        units_per_node: slots (GPUs / expert-TP degree) of each node.
        colocate: experts outnumber the slots (several per GPU allowed); else every group needs a slot per expert.
    """
    e, n = load_E.numel(), len(units_per_node)
    size = e // expert_groups
    if expert_groups < n:
        raise ValueError(f"expert_groups={expert_groups} < {n} nodes: with every routing group on one node, some "
                         "nodes would hold no expert")
    if colocate:
        room = [math.ceil(expert_groups * u / sum(units_per_node)) for u in units_per_node]
    else:
        room = [u // size for u in units_per_node]
    if sum(room) < expert_groups:
        raise ValueError(f"expert_groups={expert_groups} groups of {size} experts do not fit one group per node "
                         f"on nodes of {list(units_per_node)} slots")
    group_load = load_E.view(expert_groups, size).sum(dim=1).tolist()
    node_load, node_groups = [0.0] * n, [0] * n
    out = [0] * expert_groups
    for g in sorted(range(expert_groups), key=lambda g: (-group_load[g], g)):
        node = min((m for m in range(n) if node_groups[m] < room[m]),
                   key=lambda m: (node_load[m] / units_per_node[m], node_groups[m], m))
        out[g] = node
        node_load[node] += group_load[g]
        node_groups[node] += 1
    return out


def grouped_units(load_E: torch.Tensor, expert_groups: int, units_per_node: Sequence[int],
                  allow_colocate: bool) -> tuple[list[tuple[int, ...]], torch.Tensor]:
    """Steps 1 and 2: what each slot holds and its node, every routing group on one node.

    Returns:
        unit_experts: the experts of each slot (one, or several when colocated).
        node_of_unit_U: int64 node of each slot.
    """
    e = load_E.numel()
    size = check_expert_groups(e, expert_groups)
    colocate = e > sum(units_per_node)
    if colocate and not allow_colocate:
        raise ValueError(f"num_experts={e} > {sum(units_per_node)} GPUs: one expert per GPU is impossible; pass "
                         "allow_colocate=True to put several experts on one GPU")
    group_node = nodes_of_groups(load_E, expert_groups, units_per_node, colocate)
    units: list[tuple[int, ...]] = []
    nodes: list[int] = []
    for node, slots in enumerate(units_per_node):
        experts = [x for x in range(e) if group_node[x // size] == node]
        node_load = load_E[experts]
        if len(experts) <= slots:
            counts = search.replica_counts(node_load, slots)
            held = [(experts[i],) for i in range(len(experts)) for _ in range(counts[i])]
        else:
            held = [tuple(experts[i] for i in b) for b in search.colocated_bins(node_load, slots)]
        units += held
        nodes += [node] * len(held)
    return units, torch.tensor(nodes, dtype=torch.int64)


def group_nodes(placement: Any, num_groups: int) -> list[tuple[int, ...]]:
    """The nodes holding some expert (or replica) of each routing group [G], ascending."""
    size = check_expert_groups(placement.num_experts, num_groups)
    node_of_rank = placement.topology.node_of_rank()
    out: list[set[int]] = [set() for _ in range(num_groups)]
    for rank, held in enumerate(placement.rank_to_experts):
        for x in held:
            out[x // size].add(node_of_rank[rank])
    return [tuple(sorted(s)) for s in out]


def max_nodes_per_token(placement: Any, num_groups: int, group_topk: int) -> int:
    """The most nodes one token may reach: the largest union of the nodes of ``group_topk`` of the groups (exact
    when there are at most 100,000 such choices, else the upper bound min(nodes, sum of the largest counts))."""
    nodes = group_nodes(placement, num_groups)
    if not 1 <= group_topk <= num_groups:
        raise ValueError(f"group_topk={group_topk} must be between 1 and num_groups={num_groups}")
    if math.comb(num_groups, group_topk) <= 100_000:
        return max(len(set().union(*(set(nodes[g]) for g in choice)))
                   for choice in itertools.combinations(range(num_groups), group_topk))
    largest = sorted((len(s) for s in nodes), reverse=True)[:group_topk]
    return min(placement.topology.num_nodes, sum(largest))
