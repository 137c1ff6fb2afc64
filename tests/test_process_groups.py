"""Process groups of a placement on 4 gloo ranks: membership of every group, and expert gradients reduced over
the ranks holding the same shard (``grads.reduce_expert_gradients``), with uneven replica counts, expert-TP,
data-parallel copies, and replica groups inside one copy (``build_replica_groups``).

Gradients are filled with the rank's own number (rank + 1), so a wrong group shows in the sums.
"""
from __future__ import annotations

from typing import Any

import torch

from conftest import world
from largeep_plugin.placement.plan import Placement
from largeep_plugin.layer.grads import reduce_expert_gradients
from largeep_plugin.layer.process_groups import build_process_groups, build_replica_groups
from largeep_plugin.placement.topology import Topology


def _reduced(groups: Any, rank: int, scale: float = 1.0, attr: str = "expert_dp_group") -> dict[int, list[float]]:
    """Reduce a [2]-element "gradient" = rank + 1 (and a [3]-element one = 10 * (rank + 1)) per held expert, over
    the group of each expert (``groups``: an ``ExpertProcessGroups`` or {expert: group}), then times ``scale``."""
    by_expert = groups if isinstance(groups, dict) else groups.expert_dp_groups
    params = {}
    for x in sorted(by_expert):
        a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
        a.grad, b.grad = torch.full((2,), rank + 1.0), torch.full((3,), 10.0 * (rank + 1))
        for p in (a, b):
            p.allreduce = False
            setattr(p, attr, by_expert[x])
        params[x] = [a, b]
    reduce_expert_gradients([p for ps in params.values() for p in ps], group_attr=attr)
    return {x: [float(p.grad[0]) * scale for p in ps] for x, ps in params.items()}


def _scenarios(rank: int, world_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # 1. 2 nodes x 2 GPUs, 3 experts, expert 0 twice (ranks 0 and 2), experts 1 and 2 alone
    uneven = Placement(topology=Topology.uniform(2, 2), num_experts=3, rank_to_experts=((0,), (1,), (0,), (2,)))
    g = build_process_groups(uneven)
    out["uneven"] = dict(ep=g.ep_ranks, replica=g.replica_ranks, dp=g.expert_dp_ranks,
                         alone={x: grp is None for x, grp in g.expert_dp_groups.items()},
                         tp=g.expert_tp_group is None, grads=_reduced(g, rank))
    # 2. expert-TP 2 on one node of 4: experts 0 (ranks 0, 1) and 1 (ranks 2, 3), one replica each
    tp = Placement(topology=Topology.uniform(1, 4), num_experts=2, rank_to_experts=((0,), (0,), (1,), (1,)),
                   expert_tp_degree=2)
    g = build_process_groups(tp)
    tp_sum = torch.tensor([rank + 1.0])
    torch.distributed.all_reduce(tp_sum, group=g.expert_tp_group)
    out["tp"] = dict(tp_sum=float(tp_sum), dp=g.expert_dp_ranks, replica=g.replica_ranks, grads=_reduced(g, rank))
    # 3. two data-parallel copies of a 2-rank placement (identity): expert x on ranks x and x + 2
    g = build_process_groups(Placement.identity(2))
    out["copies"] = dict(ep=g.ep_ranks, dp=g.expert_dp_ranks, grads=_reduced(g, rank, scale=0.5))
    # 4. the same copies given explicitly, interleaved: copy 0 = ranks 0, 2; copy 1 = ranks 1, 3
    g = build_process_groups(Placement.identity(2), ep_ranks=[[0, 2], [1, 3]])
    out["interleaved"] = dict(ep=g.ep_ranks, dp=g.expert_dp_ranks, experts=g.experts)
    # 5. replica groups inside one copy: expert 0 on both ranks of each copy [0, 1] and [2, 3]; then one copy of 4
    #    ranks holding experts 0, 1, 0, 1
    in_copy = build_replica_groups(((0,), (0,)), [[0, 1], [2, 3]])
    one_copy = build_replica_groups(((0,), (1,), (0,), (1,)), [[0, 1, 2, 3]])
    out["replica_groups"] = dict(in_copy=_reduced(in_copy, rank, attr="replica_group"),
                                 one_copy=_reduced(one_copy, rank, attr="replica_group"))
    # 6. bad input: the same ValueError on every rank, before any group is made
    errors = []
    for call in (lambda: build_process_groups(Placement.identity(3)),
                 lambda: build_process_groups(Placement.identity(2), ep_ranks=[[0, 1], [1, 2]]),
                 lambda: build_replica_groups(((0,), (0,)), [[0, 1, 2, 3]])):
        try:
            call()
            errors.append("ok")
        except ValueError as err:
            errors.append(str(err))
    out["errors"] = errors
    return out


def test_groups_and_gradient_reduction() -> None:
    res = world(_scenarios, 4, timeout=180.0)
    # 1. uneven replicas: expert 0's two copies hold 1 + 3; single replicas keep their own gradient
    assert [r["uneven"]["ep"] for r in res] == [(0, 1, 2, 3)] * 4
    assert res[0]["uneven"]["replica"] == {0: (0, 2)} and res[2]["uneven"]["dp"] == {0: (0, 2)}
    assert res[1]["uneven"]["alone"] == {1: True} and res[0]["uneven"]["alone"] == {0: False}
    assert all(r["uneven"]["tp"] for r in res)
    assert res[0]["uneven"]["grads"] == res[2]["uneven"]["grads"] == {0: [4.0, 40.0]}
    assert res[1]["uneven"]["grads"] == {1: [2.0, 20.0]} and res[3]["uneven"]["grads"] == {2: [4.0, 40.0]}
    # 2. expert-TP groups are {0, 1} and {2, 3}; one replica per shard, so nothing to reduce
    assert [r["tp"]["tp_sum"] for r in res] == [3.0, 3.0, 7.0, 7.0]
    assert res[1]["tp"]["dp"] == {0: (1,)} and res[1]["tp"]["replica"] == {0: (0, 1)}
    assert [r["tp"]["grads"] for r in res] == [{0: [1.0, 10.0]}, {0: [2.0, 20.0]}, {1: [3.0, 30.0]},
                                                {1: [4.0, 40.0]}]
    # 3. copies: expert x's gradient is summed over ranks x and x + 2, then scaled by 1/2 (a mean over copies)
    assert [r["copies"]["ep"] for r in res] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert res[3]["copies"]["dp"] == {1: (1, 3)}
    assert [r["copies"]["grads"] for r in res] == [{0: [2.0, 20.0]}, {1: [3.0, 30.0]}, {0: [2.0, 20.0]},
                                                    {1: [3.0, 30.0]}]
    # 4. explicit copies
    assert [r["interleaved"]["ep"] for r in res] == [(0, 2), (1, 3), (0, 2), (1, 3)]
    assert [r["interleaved"]["experts"] for r in res] == [(0,), (0,), (1,), (1,)]
    assert res[2]["interleaved"]["dp"] == {1: (2, 3)}
    # 5. replica groups: summed inside each copy only (1 + 2, 3 + 4), or over ranks {0, 2} and {1, 3}
    assert [r["replica_groups"]["in_copy"] for r in res] == [{0: [3.0, 30.0]}] * 2 + [{0: [7.0, 70.0]}] * 2
    assert [r["replica_groups"]["one_copy"] for r in res] == [{0: [4.0, 40.0]}, {1: [6.0, 60.0]},
                                                              {0: [4.0, 40.0]}, {1: [6.0, 60.0]}]
    # 6. bad input
    first, second, third = res[0]["errors"]
    assert "world_size=4 is not a multiple of the placement's 3 ranks" in first
    assert "ep_ranks must split the 4 ranks into copies of 2" in second
    assert "every EP group must have the 2 ranks of rank_to_experts" in third
