"""Node-batched (hierarchical) dispatch: equals flat, forward and backward; a token crosses nodes once per remote
node; bad layouts are refused.

Nodes are emulated by rank grouping (ranks_per_node consecutive ranks per node), no namespaces needed.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from largeep_plugin.layer.config import LargeEPConfig
from largeep_plugin.layer.dispatcher import AllToAllDispatcher
from largeep_plugin.layer.hierarchical import HierarchicalDispatcher, NodeLayout, internode_rows, to_subgroup
from largeep_plugin.layer.moe_layer import LargeEPMoE
from largeep_plugin.layer.token_exchange import TokenExchange
from largeep_plugin.layer.process_groups import build_node_groups
from conftest import make_config, world
from test_overlap import assert_close, compare, layer_run


def _hier_rank(rank: int, world_size: int, ranks_per_node: int) -> dict[str, dict[str, float]]:
    e = world_size
    counts = [4 + 5 * r % 9 for r in range(world_size)]
    counts[-1] = 0
    cases: dict[str, Any] = {
        "gelu-top2": dict(top_k=2),
        "swiglu-sigmoid-top3": dict(activation="swiglu", score_function="sigmoid", top_k=3),
        "capacity-0.6-top2": dict(top_k=2, capacity_factor=0.6),
        "top_k=E": dict(top_k=e, normalize_topk=False),
    }
    out = {}
    for i, (name, fields) in enumerate(cases.items()):
        want = layer_run(make_config(e, **fields), counts, seed=10 + i)
        for chunks in (1, 3):
            cfg = make_config(e, dispatch="hierarchical", overlap_chunks=chunks, **fields)
            out[f"{name}-chunks{chunks}"] = compare(layer_run(cfg, counts, seed=10 + i, ranks_per_node=ranks_per_node), want)
    return out


@pytest.mark.parametrize("ep,ranks_per_node", [(4, 2), (8, 4), (8, 2)], ids=["2x2", "2x4", "4x2"])
def test_hierarchical_equals_flat(ep: int, ranks_per_node: int) -> None:
    assert_close(world(_hier_rank, ep, ranks_per_node))


def _tagged_plan(rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(rank)
    t, k = 9, 3
    dest_TK = torch.stack([torch.randperm(world_size, generator=gen)[:k] for _ in range(t)])
    keep_TK = torch.rand(t, k, generator=gen) > 0.2
    weights_TK = torch.rand(t, k, generator=gen)
    x_TH = torch.zeros(t, 4)
    x_TH[:, 0], x_TH[:, 1] = rank, torch.arange(t, dtype=torch.float32)  # tag: (source rank, token)
    return x_TH, dest_TK, keep_TK, weights_TK


def _dispatch_rank(rank: int, world_size: int, ranks_per_node: int) -> dict[str, Any]:
    layout = NodeLayout(num_ranks=world_size, ranks_per_node=ranks_per_node)
    x_TH, dest_TK, keep_TK, weights_TK = _tagged_plan(rank, world_size)
    hier = HierarchicalDispatcher(None, ranks_per_node)
    flat = AllToAllDispatcher(None)
    rows_h, handle_h = hier.dispatch(x_TH, dest_TK, keep_TK, weights_TK)
    rows_f, handle_f = flat.dispatch(x_TH, dest_TK, keep_TK, weights_TK)
    # Two dispatches in flight, combined in the opposite order: the dispatchers keep no per-call state.
    y_f = flat.combine(rows_f * (rank + 1), handle_f)
    y_h = hier.combine(rows_h * (rank + 1), handle_h)
    remote = [r for r in range(world_size) if layout.node_of(r) != layout.node_of(rank)]
    return {
        "arrived_h": sorted(map(tuple, rows_h[:, :2].tolist())),
        "arrived_f": sorted(map(tuple, rows_f[:, :2].tolist())),
        "y_err": float((y_h - y_f).abs().max()),
        "y_scale": float(y_f.abs().max()),
        "s1_send": handle_h.splits.s1_send,
        "crossing_h": sum(handle_h.splits.s1_send[r] for r in remote),
        "crossing_f": sum(handle_f.send_splits[r] for r in remote),
        "counted": internode_rows(dest_TK, keep_TK, rank, layout),
    }


@pytest.mark.parametrize("ep,ranks_per_node", [(4, 2), (8, 4)], ids=["2x2", "2x4"])
def test_tokens_cross_nodes_once_per_remote_node(ep: int, ranks_per_node: int) -> None:
    results = world(_dispatch_rank, ep, ranks_per_node)
    for rank, r in enumerate(results):
        # Each expert gets exactly the (source, token) rows the flat dispatcher delivers, and combine agrees.
        assert r["arrived_h"] == r["arrived_f"], rank
        assert r["y_err"] <= 1e-6 * max(1.0, r["y_scale"]) and r["y_scale"] > 0, r
        # Stage 1 only talks to the rank's rail: the ranks with the same local index on every node.
        assert all(n == 0 for dst, n in enumerate(r["s1_send"]) if dst % ranks_per_node != rank % ranks_per_node)
        # What crosses nodes is what internode_rows counts: flat per (token, remote expert), hierarchical per
        # (token, remote node).
        assert (r["crossing_f"], r["crossing_h"]) == r["counted"], (rank, r)
    flat = sum(r["crossing_f"] for r in results)
    hier = sum(r["crossing_h"] for r in results)
    assert 0 < hier < flat, (flat, hier)  # top-3 of few nodes: dedup happens


def test_internode_rows_by_hand() -> None:
    layout = NodeLayout(num_ranks=4, ranks_per_node=2)  # node 0: ranks 0-1, node 1: ranks 2-3
    dest_TK = torch.tensor([[2, 3], [0, 2], [1, 0], [3, 2]])
    keep_TK = torch.tensor([[True, True], [True, True], [True, True], [True, False]])
    # Seen from rank 0: token 0 has two experts on node 1 (flat 2 rows, hierarchical 1), token 1 one (1, 1),
    # token 2 none, token 3 one kept (1, 1).
    assert internode_rows(dest_TK, keep_TK, 0, layout) == (4, 3)
    # Seen from rank 2 (node 1), node 0 is remote: token 1 (1, 1), token 2 (2, 1).
    assert internode_rows(dest_TK, keep_TK, 2, layout) == (3, 2)


def test_bad_layouts_are_refused() -> None:
    with pytest.raises(ValueError, match="at least two nodes"):
        NodeLayout(num_ranks=4, ranks_per_node=4)
    with pytest.raises(ValueError, match="ranks_per_node=3 does not divide"):
        NodeLayout(num_ranks=8, ranks_per_node=3)
    with pytest.raises(ValueError, match="ranks_per_node=0"):
        NodeLayout(num_ranks=8, ranks_per_node=0)
    with pytest.raises(ValueError, match="ranks_per_node=True"):
        NodeLayout(num_ranks=8, ranks_per_node=True)
    cfg = LargeEPConfig(hidden_size=8, ffn_hidden_size=8, num_experts=1, top_k=1, dispatch="hierarchical")
    assert not dist.is_initialized()  # a single process: one node
    with pytest.raises(ValueError, match="at least two nodes"):
        LargeEPMoE(cfg, ranks_per_node=1)
    with pytest.raises(ValueError, match="needs ranks_per_node"):
        LargeEPMoE(cfg)
    with pytest.raises(ValueError, match="dispatch='nodes'"):
        cfg.replace(dispatch="nodes")
    with pytest.raises(ValueError, match="ranks_per_node=-1"):
        TokenExchange(cfg.replace(dispatch="flat").dispatch_config, None, ranks_per_node=-1)


def _node_groups_rank(rank: int, world_size: int, ranks_per_node: int) -> dict[str, Any]:
    groups = build_node_groups(list(range(world_size)), ranks_per_node)
    e, g = world_size, ranks_per_node
    counts = [3 + 5 * r % 7 for r in range(world_size)]
    counts[1] = 0
    layer = {}
    for i, fields in enumerate([dict(top_k=2), dict(activation="swiglu", score_function="sigmoid", top_k=3)]):
        want = layer_run(make_config(e, **fields), counts, seed=20 + i)
        for chunks in (1, 3):
            cfg = make_config(e, dispatch="hierarchical", overlap_chunks=chunks, **fields)
            layer[f"case{i}-chunks{chunks}"] = compare(layer_run(cfg, counts, 20 + i, node_groups=groups), want)
    # The dispatcher on the subgroups delivers the same rows as over the whole EP group, splits in subgroup order.
    x_TH, dest_TK, keep_TK, weights_TK = _tagged_plan(rank, world_size)
    sub = HierarchicalDispatcher(None, g, groups)
    whole = HierarchicalDispatcher(None, g)
    rows_s, handle_s = sub.dispatch(x_TH, dest_TK, keep_TK, weights_TK)
    rows_w, handle_w = whole.dispatch(x_TH, dest_TK, keep_TK, weights_TK)
    y_s = sub.combine(rows_s * (rank + 1), handle_s)
    y_w = whole.combine(rows_w * (rank + 1), handle_w)
    errors = {}
    wrong_g = world_size // 2 if g != world_size // 2 else 1
    try:
        HierarchicalDispatcher(None, wrong_g, groups)
    except ValueError as err:
        errors["mismatch"] = str(err)
    try:
        build_node_groups(list(range(world_size)), 3)
    except ValueError as err:
        errors["not_dividing"] = str(err)
    return {
        "layer": layer, "wrong_g": wrong_g, "errors": errors,
        "rows_equal": torch.equal(rows_s, rows_w), "y_equal": torch.equal(y_s, y_w),
        "node_members": groups.node_members, "rail_members": groups.rail_members,
        "s1_len": len(handle_s.splits.s1_send), "s2_len": len(handle_s.splits.s2_recv),
        "node_size": dist.get_world_size(groups.node_group), "rail_size": dist.get_world_size(groups.rail_group),
    }


@pytest.mark.parametrize("ep,ranks_per_node", [(4, 2), (8, 4)], ids=["2x2", "2x4"])
def test_node_and_rail_groups_equal_whole_group(ep: int, ranks_per_node: int) -> None:
    results = world(_node_groups_rank, ep, ranks_per_node)
    assert_close([r["layer"] for r in results])
    nodes = ep // ranks_per_node
    for rank, r in enumerate(results):
        node, local = rank // ranks_per_node, rank % ranks_per_node
        assert r["node_members"] == tuple(range(node * ranks_per_node, (node + 1) * ranks_per_node)), r
        assert r["rail_members"] == tuple(range(local, ep, ranks_per_node)), r
        assert (r["node_size"], r["rail_size"]) == (ranks_per_node, nodes), r
        assert (r["s1_len"], r["s2_len"]) == (nodes, ranks_per_node), r
        assert r["rows_equal"] and r["y_equal"], rank
        assert f"built with ranks_per_node={ranks_per_node}" in r["errors"]["mismatch"], r
        assert "ranks_per_node=3 must divide the EP group size" in r["errors"]["not_dividing"], r


def test_splits_outside_the_subgroup_are_refused() -> None:
    assert to_subgroup([0, 5, 0, 7], (1, 3), "stage 1 send") == (5, 7)
    with pytest.raises(ValueError, match=r"stage 2 send: non-zero split sizes \{2: 4\}"):
        to_subgroup([0, 5, 4, 7], (1, 3), "stage 2 send")
    with pytest.raises(RuntimeError, match="needs torch.distributed"):
        build_node_groups([0, 1, 2, 3], 2)
