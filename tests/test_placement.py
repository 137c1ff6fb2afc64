"""Expert placement: the traffic model on hand-computed layouts, the planner's rules and invariants, replica
choice per token, determinism, bad input, and the benchmark targets on small cases.

Shape legend:  T tokens   K top_k   E experts   N nodes
"""
from __future__ import annotations

import itertools
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from largeep_plugin.placement import search
from largeep_plugin.cli import main as cli_main
from largeep_plugin.placement.plan import (Placement, assemble_placement, eplb_placement, expert_tp_degree, layout_problem,
                                      naive_placement, plan_placement)
from largeep_plugin.tools.placement_bench import compare, synthetic_trace, trace_figures, trace_stats
from largeep_plugin.placement.figures import route_flows, routing_stats
from largeep_plugin.placement.topology import GIB, Topology

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "topologies"


def _layout(topo: Topology, held: list[int]) -> Placement:
    return Placement(topology=topo, num_experts=max(held) + 1, rank_to_experts=tuple((x,) for x in held))


# ---- the model on hand-computed cases -------------------------------------------------------------------------

def test_route_flows_fill_local_replicas_then_spill() -> None:
    # 3 replicas of one expert: 2 on node 0, 1 on node 1; half the tokens start on each node. Node 0 keeps its
    # half (room 2/3); node 1 serves 1/3 itself and sends the other 1/6 to node 0.
    flow = route_flows(torch.tensor([[[2 / 3], [1 / 3]]], dtype=torch.float64), torch.tensor([0.5, 0.5]).double())
    assert torch.allclose(flow[0, :, :, 0], torch.tensor([[0.5, 0.0], [1 / 6, 1 / 3]], dtype=torch.float64))


def test_node_batched_traffic_counts_a_token_once_per_node() -> None:
    topo = Topology.uniform(2, 2)
    p = _layout(topo, [0, 1, 2, 3])           # experts 0, 1 on node 0; 2, 3 on node 1
    t = 1000.0
    # every token chooses experts 2 and 3 (both on node 1): node 0's 500 tokens cross once each, not twice
    load = [0.0, 0.0, t, t]
    coact = [[0.0] * 4 for _ in range(4)]
    coact[2][3] = coact[3][2] = t
    f = p.figures(load, coact, top_k=2, bytes_per_token=10.0)
    assert f.link_bytes[0][1] == pytest.approx(500 * 10.0) and f.link_bytes[1][0] == 0.0
    assert f.total_internode_bytes == pytest.approx(5000.0)
    # without co-activation each (token, expert) pair is counted, as flat dispatch sends it
    assert p.figures(load, None, bytes_per_token=10.0).link_bytes[0][1] == pytest.approx(1000 * 10.0)
    # per-GPU load: ranks 2 and 3 take every token, the mean is half of that
    assert f.gpu_load == (0.0, 0.0, t, t) and f.gpu_imbalance == pytest.approx(2.0)


def test_coactivated_pairs_go_on_one_node() -> None:
    # half the tokens choose (0, 3), half choose (1, 2). Grouping {0, 3} and {1, 2} by node sends T/4 tokens
    # each way (the half whose pair lives on the other node); the contiguous layout sends every token: T/2.
    topo, t = Topology.uniform(2, 2), 4000.0
    load = [t / 2] * 4
    coact = [[0.0] * 4 for _ in range(4)]
    for a, b in ((0, 3), (1, 2)):
        coact[a][b] = coact[b][a] = t / 2
    ours = plan_placement(4, topo, load=load, coactivation=coact, top_k=2)
    node = [topo.node_of(ours.expert_to_ranks[x][0]) for x in range(4)]
    assert node[0] == node[3] and node[1] == node[2] and node[0] != node[1]
    assert ours.figures(load, coact).max_link_bytes == pytest.approx(t / 4)
    assert naive_placement(4, topo).figures(load, coact).max_link_bytes == pytest.approx(t / 2)


def test_replica_counts_are_optimal() -> None:
    # every way to give 10 GPUs to 4 experts (at least one each): none has a smaller largest load per replica
    load = torch.tensor([7.0, 4.0, 2.0, 0.5])
    best = min(max(float(x) / c for x, c in zip(load, counts))
               for counts in itertools.product(range(1, 8), repeat=4) if sum(counts) == 10)
    counts = search.replica_counts(load, 10)
    assert sum(counts) == 10 and max(float(x) / c for x, c in zip(load, counts)) == pytest.approx(best)


def test_replica_counts_and_eplb_packing_by_hand() -> None:
    # D'Hondt: [6, 3, 1] over 6 slots -> (6,3,1) e0 -> (3,3,1) tie, lowest id e0 -> (2,3,1) e1 -> [3, 2, 1]
    assert search.replica_counts(torch.tensor([6.0, 3.0, 1.0]), 6) == [3, 2, 1]
    # EPLB step 1 on [5, 4, 3, 1] into 2 nodes of 2: 5 -> n0, 4 -> n1, 3 -> n1 (4 < 5), 1 -> n0
    slots = search.eplb_slots(torch.tensor([5.0, 4.0, 3.0, 1.0]), (2, 2))
    assert sorted(slots[:2]) == [(0,), (3,)] and sorted(slots[2:]) == [(1,), (2,)]


def test_expert_tp_degree() -> None:
    topo = Topology.uniform(2, 4, gpu_memory_gib=80)
    assert expert_tp_degree(None, topo) == 1
    assert expert_tp_degree(int(1.5 * 80 * GIB), topo) == 2
    assert expert_tp_degree(int(3.5 * 80 * GIB), topo) == 4
    with pytest.raises(ValueError, match="no expert-TP degree >= 5 divides"):
        expert_tp_degree(5 * 80 * GIB, topo)
    p = plan_placement(4, topo, load=[4, 3, 2, 1], expert_bytes=int(1.5 * 80 * GIB))
    assert p.expert_tp_degree == 2
    assert all(len(rep) == 2 and rep[1] == rep[0] + 1 and rep[0] % 2 == 0 for x in range(4) for rep in p.replicas(x))
    dest = p.destination_ranks(torch.tensor([[0, 1], [2, 3]]), src_rank=0)
    assert dest.tolist() == [[p.replicas(0)[0][0], p.replicas(1)[0][0]], [p.replicas(2)[0][0], p.replicas(3)[0][0]]]


# ---- planner rules and invariants -----------------------------------------------------------------------------

@pytest.mark.parametrize("num_experts", [3, 5, 8])
def test_invariants(num_experts: int) -> None:
    topo = Topology.uniform(2, 4)
    ids = synthetic_trace(num_experts, zipf=1.2, top_k=2, num_tokens=2000, seed=num_experts)
    load, coact = trace_stats(ids, num_experts)
    p = plan_placement(num_experts, topo, load=load, coactivation=coact, top_k=2)
    assert all(len(h) == 1 for h in p.rank_to_experts)                          # one expert per GPU
    assert sorted(set(p.rank_to_expert)) == list(range(num_experts))           # every expert placed
    assert all(len(set(r)) == len(r) for r in p.expert_to_ranks)               # replicas on distinct GPUs
    assert p.num_replicas == search.replica_counts(load.double(), 8)           # spare GPUs to the hottest
    hottest = int(load.argmax())
    if p.num_replicas[hottest] >= 2:                                           # spread across nodes
        assert {topo.node_of(r) for r in p.expert_to_ranks[hottest]} == {0, 1}
    again = plan_placement(num_experts, topo, load=load.tolist(), coactivation=coact.tolist(), top_k=2)
    assert again == p                                                          # deterministic


def test_colocation_only_when_allowed() -> None:
    topo = Topology.uniform(2, 2)
    with pytest.raises(ValueError, match="num_experts=6 > 4 GPUs.*allow_colocate=True"):
        plan_placement(6, topo)
    with pytest.warns(UserWarning, match="up to 2 experts share a GPU"):
        p = plan_placement(6, topo, load=[6, 5, 4, 3, 2, 1], allow_colocate=True)
    held = sorted(x for h in p.rank_to_experts for x in h)
    assert held == list(range(6)) and max(len(h) for h in p.rank_to_experts) == 2
    # LPT, at most 2 per GPU: 6 | 5 | 4 | 3, then 2 joins the lightest (3), 1 joins the lightest (4): max 6
    assert sorted(p.figures([6, 5, 4, 3, 2, 1]).gpu_load) == [5.0, 5.0, 5.0, 6.0]
    with pytest.raises(NotImplementedError, match="rank_to_experts"):
        p.rank_to_expert


# ---- replica choice per token ---------------------------------------------------------------------------------

def test_destination_same_node_first_then_spread() -> None:
    topo = Topology.uniform(2, 2)
    ident = Placement.identity(4, topo)
    ids = torch.randint(0, 4, (50, 2), generator=torch.Generator().manual_seed(0))
    assert torch.equal(ident.destination_ranks(ids, 3), ids)

    both = _layout(topo, [0, 1, 0, 1])        # each expert on both nodes: always the local copy
    for src in range(4):
        dest = both.destination_ranks(ids % 2, src)
        assert all(topo.node_of(r) == topo.node_of(src) for r in dest.flatten().tolist())

    # expert 0 on ranks 0, 1 (node 0) and 2 (node 1): node 1 serves 1/3 of its expert-0 tokens and sends 1/3 of
    # the expert's load (1/6 of the total) to node 0's replicas, whose fair share it fills
    skew = Placement(topology=topo, num_experts=2, rank_to_experts=((0,), (0,), (0,), (1,)))
    zeros = torch.zeros(30000, 1, dtype=torch.long)
    from_node1 = skew.destination_ranks(zeros, 3)
    assert float((from_node1 == 2).double().mean()) == pytest.approx(2 / 3, abs=0.01)
    from_node0 = skew.destination_ranks(zeros, 0)
    assert set(from_node0.flatten().tolist()) == {0, 1}
    assert float((from_node0 == 0).double().mean()) == pytest.approx(0.5, abs=0.01)   # spread on the node
    # deterministic, and chunks agree with the whole batch
    assert torch.equal(skew.destination_ranks(zeros[:100], 3), from_node1[:100])
    assert torch.equal(skew.destination_ranks(zeros[40:100], 3, token_offset=40), from_node1[40:100])


def test_replay_matches_the_estimate() -> None:
    # replaying a trace through destination_ranks counts exactly; the estimate is exact in expectation for
    # top-2 and a close fit for top-4
    topo = Topology.uniform(2, 4)
    for top_k, num_experts in ((2, 6), (4, 8)):
        ids = synthetic_trace(num_experts, zipf=1.0, top_k=top_k, num_tokens=8000, seed=3)
        load, coact = trace_stats(ids, num_experts)
        p = plan_placement(num_experts, topo, load=load, coactivation=coact, top_k=top_k)
        gpu, links = trace_figures(p, ids)
        f = p.figures(load, coact, top_k=top_k)
        assert torch.allclose(gpu, torch.tensor(f.gpu_load, dtype=torch.float64), rtol=0.05)
        assert torch.allclose(links, torch.tensor(f.link_bytes, dtype=torch.float64), rtol=0.05)


# ---- bad input ------------------------------------------------------------------------------------------------

def test_bad_input() -> None:
    topo = Topology.uniform(2, 2)
    good = [4.0, 3.0, 2.0, 1.0]
    cases = [
        (dict(load=[1.0, 2.0]), r"load must have one entry per expert \(4\)"),
        (dict(load=[1.0, -2.0, 1.0, 1.0]), "load has a negative entry"),
        (dict(load=[1.0, math.nan, 1.0, 1.0]), "load has a non-finite entry"),
        (dict(load=[0.0] * 4), "load sums to 0"),
        (dict(load=good, coactivation=[[0.0] * 3] * 3), r"coactivation must be \[4, 4\]"),
        (dict(load=good, coactivation=[[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]), "symmetric"),
        (dict(load=good, coactivation=[[0, 0, 0, 5], [0, 0, 0, 0], [0, 0, 0, 0], [5, 0, 0, 0]]),
         r"coactivation\[0\]\[3\]=5.0 exceeds the load"),
        (dict(coactivation=[[0.0] * 4] * 4), "coactivation needs the load"),
        (dict(load=good, coactivation=[[0.0] * 4] * 4, top_k=2), "were they recorded with this top_k"),
        (dict(load=good, top_k=5), r"top_k must be an integer in \[1, 4\]"),
        (dict(expert_bytes=-1), "expert_bytes must be a number > 0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            plan_placement(4, topo, **kwargs)
    with pytest.raises(ValueError, match=r"experts \[3\] are on no rank"):
        Placement(topology=topo, num_experts=4, rank_to_experts=((0,), (1,), (2,), (2,)))
    with pytest.raises(ValueError, match=r"rank_to_experts\[1\] must list distinct expert ids in \[0, 4\)"):
        Placement(topology=topo, num_experts=4, rank_to_experts=((0,), (7,), (2,), (3,)))
    with pytest.raises(ValueError, match="rank_to_experts has 3 entries, the topology 4 ranks"):
        Placement(topology=topo, num_experts=3, rank_to_experts=((0,), (1,), (2,)))
    with pytest.raises(ValueError, match="identity placement needs world_size == num_experts"):
        Placement.identity(3, topo)
    with pytest.raises(ValueError, match=r"placement: unknown key\(s\) \['x'\]"):
        Placement.from_dict({**Placement.identity(4, topo).to_dict(), "x": 1})
    with pytest.raises(ValueError, match="topk_ids_TK must be int64"):
        Placement.identity(4, topo).destination_ranks(torch.zeros(3, 2, dtype=torch.int32), 0)


def test_json_round_trip() -> None:
    p = plan_placement(5, Topology.uniform(2, 4), load=[9, 5, 3, 2, 1])
    assert Placement.from_dict(json.loads(json.dumps(p.to_dict()))) == p


# ---- benchmark targets on small cases -------------------------------------------------------------------------

def test_targets_small_cases() -> None:
    for topo, num_experts, zipf in ((Topology.uniform(2, 4), 8, 1.2), (Topology.uniform(4, 2), 8, 1.0),
                                    (Topology.uniform(2, 4), 4, 1.2)):
        ids = synthetic_trace(num_experts, zipf=zipf, top_k=2, num_tokens=4000, seed=1)
        load, coact = trace_stats(ids, num_experts)
        r = compare("small", topo, num_experts, load, coact, top_k=2, bytes_per_token=1.0, restarts=8)
        assert r.ratio("max_link_bytes", "naive") <= 1 + 1e-9
        assert r.ratio("max_link_bytes", "eplb") <= 1 + 1e-9
        assert r.ratio("max_link_bytes", "search") <= 1.05
        # the largest GPU load is the smallest any one-expert-per-GPU placement can have
        assert r.figures["ours"].max_gpu_load == pytest.approx(r.gpu_optimum)


def test_planner_matches_exhaustive_search() -> None:
    # 3 nodes x 2 GPUs, 6 experts: every split into three pairs (15 of them) scored, the best is the planner's
    topo = Topology.uniform(3, 2)
    ids = synthetic_trace(6, zipf=1.0, top_k=2, num_tokens=3000, group_size=3, seed=5)
    load, coact = trace_stats(ids, 6)
    stats = routing_stats(6, topo, load, coact, 2)
    units = [(x,) for x in range(6)]
    problem = layout_problem(units, (2, 2, 2), topo, stats)
    best = math.inf
    for perm in itertools.permutations(range(6)):
        node_of_unit = torch.tensor([perm.index(u) // 2 for u in range(6)])
        best = min(best, float(problem.cost(node_of_unit[None])[0, 0]))
    ours = plan_placement(6, topo, load=load, coactivation=coact, top_k=2)
    inv_bw = 1.0 / topo.inter_node.bandwidth_gbytes_per_s
    assert ours.figures(load, coact, top_k=2).max_link_bytes * inv_bw == pytest.approx(best, rel=1e-9)


def test_eplb_baseline_uses_the_load() -> None:
    topo = Topology.uniform(2, 2)
    p = eplb_placement(4, topo, [8.0, 1.0, 1.0, 6.0])
    # 8 and 6 are the heaviest: balanced packing puts them on different nodes
    assert topo.node_of(p.expert_to_ranks[0][0]) != topo.node_of(p.expert_to_ranks[3][0])
    assert assemble_placement(topo, 4, 1, [(0,), (1,), (2,), (3,)], torch.tensor([0, 0, 1, 1])) == naive_placement(4, topo)


# ---- the CLI --------------------------------------------------------------------------------------------------

def test_cli_plan_writes_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = synthetic_trace(12, zipf=1.2, top_k=2, num_tokens=3000, seed=2)
    load, coact = trace_stats(ids, 12)
    (tmp_path / "load.json").write_text(json.dumps({"tokens_per_expert": load.long().tolist()}))
    (tmp_path / "coact.json").write_text(json.dumps(coact.long().tolist()))
    out = tmp_path / "plan"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rc = cli_main(["plan", "--topology", str(EXAMPLES / "2x8_h100.yaml"), "--load", str(tmp_path / "load.json"),
                       "--coactivation", str(tmp_path / "coact.json"), "--top-k", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "naive" in text and "eplb" in text and "replicas:" in text
    saved = json.loads((out / "plan.json").read_text())
    assert Placement.from_dict(saved["placement"]).num_replicas == search.replica_counts(load, 16)
    assert saved["figures"]["ours"]["max_link_bytes"] <= saved["figures"]["naive"]["max_link_bytes"]
    assert (out / "placement.png").read_bytes()[:4] == b"\x89PNG"

    (tmp_path / "bad.json").write_text(json.dumps({"tokens": [1, 2]}))
    rc = cli_main(["plan", "--topology", str(EXAMPLES / "4x4.yaml"), "--load", str(tmp_path / "bad.json")])
    assert rc == 2 and "expected a list or {\"tokens_per_expert\": ...}" in capsys.readouterr().err


def test_numpy_inputs_are_accepted() -> None:
    np = pytest.importorskip("numpy")  # the core never imports numpy; users' numbers often are numpy's
    topo = Topology.uniform(2, 4)
    load = [9.0, 1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 4.0]
    want = plan_placement(8, topo, load=load, top_k=2)
    got = plan_placement(np.int64(8), topo, load=np.array(load), top_k=np.int64(2))
    assert got == want and type(got.num_experts) is int
    by_hand = Placement(topology=topo, num_experts=np.int64(8),
                        rank_to_experts=tuple((np.int64(x),) for x in range(8)), expert_tp_degree=np.int32(1))
    assert by_hand == Placement.identity(8, topo)
    json.dumps(by_hand.to_dict())  # plain ints: numpy's would not serialise
    ids_TK = torch.tensor([[0, 5]])
    assert by_hand.destination_ranks(ids_TK, np.int64(3)).tolist() == [[0, 5]]
