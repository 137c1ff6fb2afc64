"""The clone planner of dynamic replicas (placement/clones.py): water-filling by hand, where clones go (the busiest
rank first, then the busiest link, then the feeding home's node), the split that counts the home rank's own load,
hysteresis, the route tables, determinism, the balance it reaches, and bad input.

Shape legend:  E experts   R ranks   S spare slots per rank   N nodes
"""
from __future__ import annotations

import pytest
import torch

from largeep_plugin.placement.clones import (ClonePlan, _waterfill, no_clones, plan_clones, plan_from_clones,
                                             replan)
from largeep_plugin.placement.topology import Topology


def _one_per_rank(r: int) -> list[tuple[int]]:
    return [(x,) for x in range(r)]


def test_waterfill_by_hand() -> None:
    # Other rows 0, 2, 10 and 4 rows to pour: the level is 3 (3 + 1 = 4), the third rank gets nothing.
    got = _waterfill(torch.tensor([0.0, 2.0, 10.0], dtype=torch.float64), 4.0)
    assert got.tolist() == [3.0, 1.0, 0.0]
    assert _waterfill(torch.tensor([1.0, 1.0], dtype=torch.float64), 0.0).tolist() == [0.0, 0.0]


def test_the_home_ranks_own_load_counts() -> None:
    # Rank 0 holds experts 0 (6 rows) and 1 (2 rows), rank 1 expert 2 (no rows). One clone of expert 0 on rank 1
    # takes 4 of its 6 rows, not 3: rank 0 still computes expert 1. Both ranks end at 4 rows.
    plan = plan_clones([6.0, 2.0, 0.0], [(0, 1), (2,)], 1, Topology.uniform(1, 2))
    assert plan.clones == ((-1,), (0,)) and plan.feeders == ((-1,), (0,))
    assert plan.copies(0) == ((0, 0), (1, 2))            # slot 2 = spare slot 0 after L = 2 home slots
    assert plan.shares[0] == pytest.approx((2 / 6, 4 / 6))
    assert plan.rows_per_rank([6.0, 2.0, 0.0]).tolist() == pytest.approx([4.0, 4.0])
    assert plan.transfers() == ((0, 0, 1, 0),)           # rank 0's home slot 0 feeds rank 1's spare slot 0


def test_hot_experts_spread_until_balanced_and_deterministic() -> None:
    load = [700.0] + [100.0] * 7
    topo = Topology.uniform(1, 8)
    plan = plan_clones(load, _one_per_rank(8), 1, topo)
    fig = plan.figures(load)
    base = no_clones(8, _one_per_rank(8), 1, topo).figures(load)
    assert base.rank_imbalance == pytest.approx(700 / 175)
    assert fig.rank_imbalance <= 1.02 and sum(fig.rows_R) == pytest.approx(sum(load))
    for x in range(8):
        assert sum(plan.shares[x]) == pytest.approx(1.0)
    assert plan.num_clones == sum(1 for r in plan.clones if r[0] == 0) and plan.num_clones >= 4
    again = plan_clones(load, _one_per_rank(8), 1, topo)
    assert again.to_dict() == plan.to_dict()


def test_balance_target_ep16_one_spare_slot() -> None:
    # A Zipf-like load over 16 experts (expert imbalance >= 2.5): one spare slot per rank brings the busiest rank
    # within 10 % of the mean.
    load = torch.tensor([1.0 / (x + 1) ** 0.9 for x in range(16)], dtype=torch.float64) * 10_000
    assert float(load.max() / load.mean()) >= 2.5
    plan = plan_clones(load, _one_per_rank(16), 1, Topology.uniform(2, 8), row_bytes=512.0, expert_bytes=1e6)
    assert plan.figures(load).rank_imbalance <= 1.10


def test_ties_for_rows_go_where_the_busiest_link_stays_lightest() -> None:
    # 2 nodes x 2 ranks: experts 0 (rank 0, node 0) and 3 (rank 3, node 1) hot, ranks 1 and 2 idle: equal for rows.
    topo = Topology.uniform(2, 2)
    load = [300.0, 0.0, 0.0, 300.0]
    # Heavy experts: a clone's weight refresh and gradient return would dominate the link: clones stay on the
    # node of their home.
    heavy = plan_clones(load, _one_per_rank(4), 1, topo, row_bytes=1.0, expert_bytes=1e9)
    assert heavy.clones == ((-1,), (0,), (3,), (-1,))
    # Weightless experts: a clone on the other node serves that node's tokens there, so fewer rows cross.
    light = plan_clones(load, _one_per_rank(4), 1, topo, row_bytes=1.0, expert_bytes=0.0)
    assert light.clones == ((-1,), (3,), (0,), (-1,))
    for plan in (heavy, light):
        assert plan.figures(load).rank_imbalance == pytest.approx(1.0)
    rows = dict(row_bytes=1.0, expert_bytes=0.0)
    assert light.figures(load, **rows).max_link_seconds < heavy.figures(load, **rows).max_link_seconds


def test_route_tables_same_node_first() -> None:
    # Expert 0 with a copy on each node, half its rows each: each node's tokens stay on their node.
    topo = Topology.uniform(2, 2)
    plan = plan_from_clones(4, _one_per_rank(4), [[-1], [-1], [0], [-1]], topo, [400.0, 200.0, 0.0, 200.0])
    assert plan.copies(0) == ((0, 0), (2, 1)) and plan.shares[0] == pytest.approx((0.5, 0.5))
    cum, rank, slot = plan.route_tables()
    assert cum[0, 0, :2].tolist() == [1.0, 1.0] and rank[0, 0, 0] == 0           # node 0 -> its own copy
    assert cum[1, 0, :2].tolist() == [0.0, 1.0] and (rank[1, 0, 1], slot[1, 0, 1]) == (2, 1)  # node 1 -> rank 2
    # An expert with one copy: everyone goes there.
    assert cum[0, 1, 0] == 1.0 and rank[1, 1, 0] == 1


def test_hysteresis_keeps_a_plan_that_is_good_enough() -> None:
    topo = Topology.uniform(1, 8)
    home = _one_per_rank(8)
    load = [700.0] + [100.0] * 7
    first, changed = replan(None, load, home, 1, topo)
    assert changed and first.num_clones > 0
    # A little noise: the clones stay, the shares follow the new load.
    noisy = [690.0, 105.0] + [100.0] * 6
    kept, changed = replan(first, noisy, home, 1, topo, margin=0.05)
    assert not changed and kept.clones == first.clones and kept.shares != first.shares
    # The hot expert moves: the plan follows.
    moved = [100.0] * 7 + [700.0]
    new, changed = replan(first, moved, home, 1, topo, margin=0.05)
    assert changed and new.figures(moved).rank_imbalance <= 1.02
    assert 7 in {m["expert"] for m in new.moved_from(first)}


def test_static_replicas_and_colocated_homes() -> None:
    # Expert 0 has two homes (static replicas); with no clones its rows split by water-filling between them.
    topo = Topology.uniform(1, 3)
    home = [(0,), (0,), (1,)]
    even = no_clones(2, home, 1, topo)
    assert even.shares[0] == (0.5, 0.5)
    plan = plan_clones([900.0, 300.0], home, 1, topo)
    assert plan.figures([900.0, 300.0]).rank_imbalance <= 1.01
    assert plan.clones[2] == (0,) and plan.feeders[2] == (0,)   # fed by the first home of expert 0


def test_plan_from_clones_round_trips() -> None:
    load = [800.0, 50.0, 50.0, 100.0]
    topo = Topology.uniform(2, 2)
    plan = plan_clones(load, _one_per_rank(4), 2, topo)
    back = plan_from_clones(4, _one_per_rank(4), plan.clones, topo, load)
    assert back.to_dict() == plan.to_dict()


def test_bad_input() -> None:
    topo = Topology.uniform(1, 2)
    with pytest.raises(ValueError, match="dynamic_replicas=-1"):
        plan_clones([1.0, 1.0], [(0,), (1,)], -1, topo)
    with pytest.raises(ValueError, match="must place every expert"):
        plan_clones([1.0, 1.0], [(0,), (0,)], 1, topo)
    with pytest.raises(ValueError, match="finite and >= 0"):
        plan_clones([1.0, -1.0], [(0,), (1,)], 1, topo)
    with pytest.raises(ValueError, match="expected one per expert"):
        no_clones(2, [(0,), (1,)], 1, topo, load_E=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="margin"):
        replan(None, [1.0, 1.0], [(0,), (1,)], 1, topo, margin=-0.1)
    with pytest.raises(ValueError, match="topology has 3 ranks|home lists 2 ranks"):
        plan_clones([1.0, 1.0], [(0,), (1,)], 1, Topology.uniform(1, 3))
    with pytest.raises(ValueError, match="its home"):
        ClonePlan(num_experts=2, home=((0,), (1,)), clones=((0,), (-1,)), feeders=((0,), (-1,)),
                  shares=((0.5, 0.5), (1.0,)), topology=topo)
    with pytest.raises(ValueError, match=r"clones_RS\[1\]\[0\]=5"):
        plan_from_clones(2, [(0,), (1,)], [[-1], [5]], topo)
