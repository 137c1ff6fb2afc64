"""Placement that honours routing groups (``plan_placement(..., expert_groups=G)``): every routing group, replicas
included, on one node; the load balanced across nodes and, inside a node, by replicas or colocated bins; how many
nodes a token may reach; and the errors of impossible group counts."""
from __future__ import annotations

import warnings

import pytest

from largeep_plugin.placement.groups import group_nodes, max_nodes_per_token
from largeep_plugin.placement.plan import Placement, plan_placement
from largeep_plugin.placement.topology import Topology


def _plan(*args, **kwargs) -> Placement:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the colocation warning
        return plan_placement(*args, **kwargs)


@pytest.mark.parametrize("experts, groups, nodes, gpus, load, colocate", [
    (8, 4, 4, 2, None, False),                                # one expert per GPU
    (8, 4, 2, 8, [50, 1, 1, 1, 1, 1, 1, 1], False),           # replicas: the hot expert's stay on its node
    (16, 4, 2, 2, None, True),                                 # DeepSeek-like: 4 experts per GPU
    (32, 8, 4, 2, [float(i % 5 + 1) for i in range(32)], True),
])
def test_every_group_on_one_node(experts: int, groups: int, nodes: int, gpus: int, load, colocate: bool) -> None:
    p = _plan(experts, Topology.uniform(nodes, gpus), load=load, allow_colocate=colocate, expert_groups=groups)
    where = group_nodes(p, groups)
    assert all(len(n) == 1 for n in where), where
    assert sorted({n[0] for n in where}) == list(range(nodes))  # every node holds groups
    assert all(held for held in p.rank_to_experts)               # and every GPU experts
    for k in range(1, groups + 1):
        assert max_nodes_per_token(p, groups, k) == min(k, nodes)
    if load is not None and not colocate:
        # The hot expert got the spare slots of its node, and only there.
        hot_ranks = [r for r, held in enumerate(p.rank_to_experts) if 0 in held]
        assert len(hot_ranks) > 1 and len({p.topology.node_of_rank()[r] for r in hot_ranks}) == 1


def test_groups_balance_the_nodes() -> None:
    # 8 groups of 2 on 2 nodes of 8 GPUs, group g with load g + 1: the nodes' loads come out even (18 and 18).
    load = [float(e // 2 + 1) for e in range(16)]
    p = _plan(16, Topology.uniform(2, 8), load=load, expert_groups=8)
    node_load = [0.0, 0.0]
    for g, (node,) in enumerate(group_nodes(p, 8)):
        node_load[node] += 2 * (g + 1)
    assert node_load == [36.0, 36.0]


def test_nodes_per_token_of_an_ungrouped_placement() -> None:
    # Groups {0,1}, {2,3}: expert 1 on node 1 splits group 0 over both nodes.
    p = Placement(topology=Topology.uniform(2, 2), num_experts=4, rank_to_experts=((0,), (2,), (1,), (3,)))
    assert group_nodes(p, 2) == [(0, 1), (0, 1)]
    assert max_nodes_per_token(p, 2, 1) == 2
    assert max_nodes_per_token(_plan(4, Topology.uniform(2, 2), expert_groups=2), 2, 1) == 1


@pytest.mark.parametrize("kwargs, words", [
    (dict(num_experts=8, expert_groups=3), "expert_groups=3 does not divide num_experts=8"),
    (dict(num_experts=8, expert_groups=0), "expert_groups=0 must be an integer >= 1"),
    (dict(num_experts=8, expert_groups=1), r"expert_groups=1 < 2 nodes"),
    (dict(num_experts=32, expert_groups=4), "allow_colocate=True"),
])
def test_impossible_groups_name_the_value(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        _plan(kwargs.pop("num_experts"), Topology.uniform(2, 4), **kwargs)


def test_plan_compare_replays_group_limited_routing_on_both_plans() -> None:
    """``largeep plan --compare``'s group table: the trace is group-limited (every token's experts in at most M of
    the G groups), and on the group-keeping plan no token reaches more than M nodes."""
    from largeep_plugin.placement.topology import Topology
    from largeep_plugin.tools.placement_bench import compare_group_routing, group_limited_trace

    ids = group_limited_trace(16, 8, 1, zipf=1.0, top_k=2, num_tokens=512)  # groups of 2 experts, one kept
    assert all(int(row[0]) // 2 == int(row[1]) // 2 for row in ids)  # both experts of a token in one group
    r = compare_group_routing("4x4", Topology.uniform(4, 4), 16, 8, 1, zipf=1.0, top_k=2, bytes_per_token=1.0,
                              num_tokens=512)
    assert r.max_nodes_per_token["grouped"] == 1
    assert set(r.internode_bytes) == {"grouped", "ignoring groups"} and r.internode_bytes["grouped"] > 0
