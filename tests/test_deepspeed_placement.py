"""DeepSpeed adapter: the "large_ep" section's placement (topology and load files) and node size.

A 2-node x 2-GPU topology file with a skewed load makes the planner permute the experts over the 4 ranks. At
EP 4 on 4 gloo ranks: the converted layer computes what the stock layer computes (stock built with ep_size=4,
whose expert weights must move to the rank that now holds them, and with ep_size=1); under the engine (ZeRO-1)
the permuted model trains exactly like the unpermuted one, its checkpoint files name the global expert ids, a
fresh engine resumes from its checkpoint, and the identity layout's weights load into the permuted layout; hierarchical dispatch with ranks_per_node 2 trains exactly like flat.
Config errors are checked without a world."""
from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("deepspeed")

from largeep_plugin.integrations.section.config import parse_large_ep_section  # noqa: E402
from largeep_plugin.integrations.deepspeed.placement import (plan_section_placement, read_load_file,  # noqa: E402
                                                         resolve_ranks_per_node)
from largeep_plugin.tools.launch import run_world  # noqa: E402
from test_deepspeed_convert import Net  # noqa: E402
from test_deepspeed_engine import _engine, _train  # noqa: E402

WORLD, STEPS = 4, 3
LOAD = [10, 9, 1, 1]  # two hot experts: a topology-aware plan puts them on different nodes


def _topology(tmp_path, nodes: int = 2, gpus: int = 2) -> str:
    path = tmp_path / f"topo_{nodes}x{gpus}.yaml"
    path.write_text(
        f"name: synthetic\nnodes: {nodes}\ngpus_per_node: {gpus}\ngpu_memory_gib: 80\n"
        "intra_node: {bandwidth_gbytes_per_s: 450, latency_us: 1}\n"
        "inter_node: {bandwidth_gbytes_per_s: 50, latency_us: 5}\n"
    )
    return str(path)


def _placement_section(tmp_path) -> dict:
    load = tmp_path / "load.json"
    load.write_text(json.dumps({"tokens_per_expert": LOAD}))
    return {"topology_file": _topology(tmp_path), "load_file": str(load)}


def _converted_vs_stock(files: dict, ep_size: int) -> dict:
    import deepspeed.utils.groups as groups
    from largeep_plugin.integrations.deepspeed.engine import ensure_expert_groups
    from largeep_plugin.integrations.deepspeed.convert import convert_moe_layers
    from largeep_plugin.integrations.deepspeed.placement import deepspeed_expert_groups

    section = parse_large_ep_section({"enabled": True, "ep_size": WORLD, "placement": files})
    placement = plan_section_placement(section, WORLD, top_k=2)
    x = torch.randn(3, 10, 8, generator=torch.Generator().manual_seed(groups.dist.get_rank()))
    outs = []
    for convert in (False, True):
        model = Net(ep_size, 2)
        model.moe.set_deepspeed_parallelism()
        if convert:
            ep_group = ensure_expert_groups(WORLD)
            convert_moe_layers(model, section, ep_group, placement=placement,
                               expert_groups=deepspeed_expert_groups(placement, ep_group, section.group_name))
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        y.square().sum().backward()
        outs.append((y.detach(), xi.grad))
    layer = model.moe.deepspeed_moe
    return {
        "max_dy": float((outs[0][0] - outs[1][0]).abs().max()),
        "max_dx": float((outs[0][1] - outs[1][1]).abs().max()),
        "scale": float(outs[0][0].abs().max()),
        "expert_id": layer.expert_id,
        "rank_to_expert": placement.rank_to_expert,
    }


def _expert_files(ckpt: str, tag: str) -> dict:
    """{file name: {key: tensor}} of the per-expert files."""
    folder = os.path.join(ckpt, tag)
    return {f: torch.load(os.path.join(folder, f), weights_only=False) for f in sorted(os.listdir(folder))
            if "_expert_" in f}


def _compare_files(files: dict) -> dict:
    """Per (identity tag, permuted tag): the file names of each, and the largest difference between the tensors
    filed under one name and key (inf when the keys differ)."""
    out = {}
    for before, after in (("flat0", "placed0"), ("flat", "placed")):
        diff = 0.0
        for name, state in files[before].items():
            other = files[after].get(name, {})
            if sorted(state) != sorted(other):
                diff = float("inf")
                continue
            for key, value in state.items():
                diff = max(diff, float((value.float() - other[key].float()).abs().max()))
        out[(before, after)] = (sorted(files[before]), sorted(files[after]), diff)
    return out


def _world(rank: int, world: int, files: dict, ckpt: str) -> dict:
    import torch.distributed as dist
    from largeep_plugin.integrations.deepspeed.engine import init_deepspeed_comm

    init_deepspeed_comm()
    out: dict = {"convert_ep4": _converted_vs_stock(files, WORLD), "convert_ep1": _converted_vs_stock(files, 1)}
    base = {"enabled": True, "ep_size": WORLD, "load_balance": {"bias_update_rate": 0.0}}

    flat = _engine(base)
    placed = _engine({**base, "placement": files})
    out["placed_experts"] = sorted({b.moe.deepspeed_moe.expert_id for b in placed.module.moe_blocks()})
    # Before training (the stock weights) and after: the same file names must hold the same experts.
    flat.save_checkpoint(ckpt, tag="flat0")
    placed.save_checkpoint(ckpt, tag="placed0")
    out["flat"] = _train(flat, rank, STEPS)
    out["placed"] = _train(placed, rank, STEPS)
    flat.save_checkpoint(ckpt, tag="flat")
    placed.save_checkpoint(ckpt, tag="placed")
    out["flat_next"] = _train(flat, rank, 2, start=STEPS)
    out["placed_next"] = _train(placed, rank, 2, start=STEPS)
    # A fresh engine from other weights resumes the permuted run from its checkpoint ...
    fresh = _engine({**base, "placement": files}, seed=99)
    fresh.load_checkpoint(ckpt, tag="placed")
    out["resumed"] = _train(fresh, rank, 2, start=STEPS)
    # ... and the weights of the identity layout's checkpoint load into the permuted layout (expert e from
    # file expert_e): the next loss is the identity run's.
    fresh.load_checkpoint(ckpt, tag="flat", load_module_only=True)
    out["cross_loaded"] = _train(fresh, rank, 1, start=STEPS)
    dist.barrier()
    if rank == 0:
        out["files"] = _compare_files({tag: _expert_files(ckpt, tag) for tag in ("flat0", "placed0", "flat", "placed")})
    del flat, placed, fresh

    hierarchical = _engine({**base, "overlap": {"dispatch": "hierarchical", "ranks_per_node": 2}})
    exchange = hierarchical.module.moe_blocks()[0].moe.deepspeed_moe.token_exchange
    out["hierarchical_dispatcher"] = type(exchange.dispatcher).__name__
    out["hierarchical"] = _train(hierarchical, rank, STEPS)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from largeep_plugin.integrations.deepspeed.engine import load_deepspeed_ops_before_fork

    load_deepspeed_ops_before_fork()
    tmp = tmp_path_factory.mktemp("placement")
    return run_world(_world, WORLD, args=(_placement_section(tmp), str(tmp / "ckpt")), timeout=400)


def test_plan_permutes_experts(tmp_path):
    section = parse_large_ep_section({"enabled": True, "ep_size": WORLD, "placement": _placement_section(tmp_path)})
    placement = plan_section_placement(section, WORLD, top_k=2)
    order = placement.rank_to_expert
    assert sorted(order) == list(range(WORLD)) and order != list(range(WORLD))
    # The two hot experts sit on different nodes (ranks 0-1 and 2-3).
    assert {order.index(0) // 2, order.index(1) // 2} == {0, 1}


@pytest.mark.parametrize("case", ["convert_ep4", "convert_ep1"])
def test_converted_with_placement_equals_stock(results, case):
    for rank, r in enumerate(results):
        c = r[case]
        assert c["expert_id"] == c["rank_to_expert"][rank]
        assert c["scale"] > 1e-2
        assert c["max_dy"] <= 1e-5 * max(1.0, c["scale"]), c
        assert c["max_dx"] <= 1e-4, c
    assert [r["convert_ep4"]["expert_id"] for r in results] != list(range(WORLD))


def test_engine_with_placement_trains_like_identity(results):
    for rank, r in enumerate(results):
        assert r["placed_experts"] == [results[0]["convert_ep4"]["rank_to_expert"][rank]]
    flat, placed = results[0]["flat"], results[0]["placed"]
    assert placed[-1] < placed[0]
    assert placed == pytest.approx(flat, abs=1e-5)


def test_checkpoint_files_name_global_expert_ids(results):
    files = results[0]["files"]
    for (before, after), (names, other_names, diff) in files.items():
        assert names == other_names and len(names) == 2 * WORLD
        # exact before training (the same stock weights); after 3 identical steps, to rounding
        assert diff <= (0.0 if before == "flat0" else 1e-5), (before, after, diff)
    for r in results:
        assert r["resumed"] == pytest.approx(r["placed_next"], abs=1e-6)
        assert r["cross_loaded"][0] == pytest.approx(r["flat_next"][0], abs=1e-5)


def test_hierarchical_equals_flat(results):
    assert results[0]["hierarchical_dispatcher"] == "HierarchicalDispatcher"
    assert results[0]["hierarchical"] == pytest.approx(results[0]["flat"], abs=1e-5)


# ---- config errors (no world) ----------------------------------------------------------------------------------
def _section(**overlap) -> object:
    return parse_large_ep_section({"enabled": True, "ep_size": WORLD, "overlap": overlap})


def test_ranks_per_node_sources_and_errors(tmp_path):
    assert resolve_ranks_per_node(_section(dispatch="hierarchical", ranks_per_node=2), None, {}) == 2
    assert resolve_ranks_per_node(_section(dispatch="hierarchical"), None, {"LOCAL_WORLD_SIZE": "2"}) == 2
    assert resolve_ranks_per_node(_section(), None, {"LOCAL_WORLD_SIZE": "3"}) is None  # flat needs none
    topo = parse_large_ep_section({"enabled": True, "ep_size": WORLD, "overlap": {"dispatch": "hierarchical"},
                                   "placement": _placement_section(tmp_path)})
    placement = plan_section_placement(topo, WORLD, top_k=2)
    assert resolve_ranks_per_node(topo, placement, {"LOCAL_WORLD_SIZE": "1"}) == 2  # the topology's nodes
    with pytest.raises(ValueError, match="ranks_per_node.*LOCAL_WORLD_SIZE"):
        resolve_ranks_per_node(_section(dispatch="hierarchical"), None, {})
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE=3 does not divide large_ep.ep_size=4"):
        resolve_ranks_per_node(_section(dispatch="hierarchical"), None, {"LOCAL_WORLD_SIZE": "3"})
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE='two'"):
        resolve_ranks_per_node(_section(dispatch="hierarchical"), None, {"LOCAL_WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="ranks_per_node=3 does not divide"):
        resolve_ranks_per_node(_section(ranks_per_node=3), None, {})
    with pytest.raises(ValueError, match="one node"):
        resolve_ranks_per_node(_section(dispatch="hierarchical", ranks_per_node=4), None, {})
    mismatch = parse_large_ep_section({"enabled": True, "ep_size": WORLD, "placement": _placement_section(tmp_path),
                                       "overlap": {"dispatch": "hierarchical", "ranks_per_node": 1}})
    with pytest.raises(ValueError, match="ranks_per_node=1 but the placement's topology has 2"):
        resolve_ranks_per_node(mismatch, placement, {})
    for bad, match in ((0, "must be >= 1"), ("2", "wrong type"), (True, "wrong type")):
        with pytest.raises(ValueError, match=match):
            _section(ranks_per_node=bad)


def test_placement_errors(tmp_path):
    def section(**files) -> object:
        return parse_large_ep_section({"enabled": True, "ep_size": WORLD, "placement": files})

    with pytest.raises(NotImplementedError, match="replicates experts.*replica group"):
        plan_section_placement(section(topology_file=_topology(tmp_path, 2, 4)), WORLD, top_k=2)
    with pytest.raises(ValueError, match="describes 2 GPUs but large_ep.ep_size=4"):
        plan_section_placement(section(topology_file=_topology(tmp_path, 1, 2)), WORLD, top_k=2)
    with pytest.raises(ValueError, match="needs large_ep.placement.topology_file"):
        plan_section_placement(section(load_file="load.json"), WORLD, top_k=2)
    with pytest.raises(ValueError, match="cannot be read"):
        plan_section_placement(section(topology_file=str(tmp_path / "missing.yaml")), WORLD, top_k=2)
    short = tmp_path / "short.json"
    short.write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match="has 3 entries but the MoE layers have 4 experts"):
        read_load_file(str(short), WORLD)
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"load": [1, 2, 3, 4]}')
    with pytest.raises(ValueError, match="tokens_per_expert"):
        read_load_file(str(wrong), WORLD)
    assert plan_section_placement(section(), WORLD, top_k=2) is None
