"""Topology: the example YAML files, the environment, rank numbering, link overrides and clear errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from largeep_plugin.placement.topology import (GIB, Link, Node, Topology, load_topology, topology_from_dict,
                                     topology_from_env)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "topologies"

BASE = {"name": "t", "nodes": 2, "gpus_per_node": 4, "gpu_memory_gib": 80,
        "intra_node": {"bandwidth_gbytes_per_s": 450, "latency_us": 1},
        "inter_node": {"bandwidth_gbytes_per_s": 400, "latency_us": 5}}


def test_example_files() -> None:
    h100 = load_topology(EXAMPLES / "2x8_h100.yaml")
    assert (h100.num_nodes, h100.world_size) == (2, 16)
    assert h100.link(0, 1).bandwidth_gbytes_per_s == 400 and h100.link(1, 1) is h100.intra_node
    assert h100.gpu_memory_bytes(15) == 80 * GIB

    grid = load_topology(EXAMPLES / "4x4.yaml")
    assert (grid.num_nodes, grid.world_size) == (4, 16)
    assert [grid.node_of(r) for r in (0, 3, 4, 15)] == [0, 0, 1, 3]

    mixed = load_topology(EXAMPLES / "hetero_3node.yaml")
    assert mixed.world_size == 20
    assert list(mixed.ranks_of(2)) == [16, 17, 18, 19]
    assert mixed.gpu_memory_bytes(17) == 40 * GIB and mixed.gpu_memory_bytes(3) == 80 * GIB
    # the override holds in both directions and only for its pair
    assert mixed.link(0, 2).bandwidth_gbytes_per_s == 100 and mixed.link(2, 0).bandwidth_gbytes_per_s == 100
    assert mixed.link(0, 1).bandwidth_gbytes_per_s == 400


def test_dict_round_trip_and_link_time() -> None:
    mixed = load_topology(EXAMPLES / "hetero_3node.yaml")
    assert topology_from_dict(mixed.to_dict()) == mixed
    # 1 GB over 100 GB/s is 10 ms, plus 8 us of latency
    assert mixed.link(1, 2).seconds(1e9) == pytest.approx(0.01 + 8e-6)
    assert mixed.node_of_rank() == (0,) * 8 + (1,) * 8 + (2,) * 4


def test_uniform_and_env() -> None:
    topo = topology_from_env({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "4"})
    assert (topo.num_nodes, topo.nodes[0].num_gpus) == (4, 4)
    assert topo == Topology.uniform(4, 4, name=topo.name)
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE is not set"):
        topology_from_env({"WORLD_SIZE": "16"})
    with pytest.raises(ValueError, match="WORLD_SIZE=10 is not a multiple of LOCAL_WORLD_SIZE=4"):
        topology_from_env({"WORLD_SIZE": "10", "LOCAL_WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer, got 'x'"):
        topology_from_env({"WORLD_SIZE": "x", "LOCAL_WORLD_SIZE": "4"})


@pytest.mark.parametrize("change, message", [
    ({"colour": 1}, r"unknown key\(s\) \['colour'\]"),
    ({"nodes": 0}, "topology.nodes must be >= 1, got 0"),
    ({"gpus_per_node": 0}, "num_gpus of node 'node0' must be an integer >= 1, got 0"),
    ({"gpu_memory_gib": -1}, "gpu_memory_gib of node 'node0' must be a finite number > 0, got -1"),
    ({"inter_node": {"bandwidth_gbytes_per_s": 0}}, "topology.inter_node: bandwidth_gbytes_per_s must be a finite"),
    ({"intra_node": {"latency_us": 1}}, r"topology.intra_node: missing key\(s\) \['bandwidth_gbytes_per_s'\]"),
    ({"links": [{"between": ["node0", "node9"], "bandwidth_gbytes_per_s": 1}]}, "unknown node 'node9'"),
    ({"links": [{"between": [0, 0], "bandwidth_gbytes_per_s": 1}]}, "a link joins two different nodes"),
    ({"links": [{"between": [0, 1], "bandwidth_gbytes_per_s": 1}, {"between": [1, 0], "bandwidth_gbytes_per_s": 2}]},
     r"node pair \(0, 1\) is given twice"),
    ({"nodes": [{"name": "a", "gpus": 2}, {"name": "a", "gpus": 2}]}, "node names must be unique"),
])
def test_bad_yaml(tmp_path: Path, change: dict, message: str) -> None:
    data = dict(BASE)
    if isinstance(change.get("nodes"), list):
        data.pop("gpus_per_node")
    data.update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=message):
        load_topology(path)


def test_bad_objects() -> None:
    with pytest.raises(ValueError, match="rank 16 is not in"):
        Topology.uniform(2, 8).node_of(16)
    with pytest.raises(ValueError, match="latency_us must be a finite number >= 0"):
        Link(bandwidth_gbytes_per_s=1.0, latency_us=-1.0)
    with pytest.raises(ValueError, match="nodes must be a non-empty tuple"):
        Topology(nodes=(), intra_node=Link(bandwidth_gbytes_per_s=1.0), inter_node=Link(bandwidth_gbytes_per_s=1.0))
    with pytest.raises(ValueError, match="num_gpus of node 'x'"):
        Node(name="x", num_gpus=2.0, gpu_memory_gib=1.0)


def test_numpy_integers_are_accepted() -> None:
    np = pytest.importorskip("numpy")  # the core never imports numpy; users' numbers often are numpy's
    topo = Topology.uniform(np.int64(2), np.int64(4), gpu_memory_gib=np.float32(80))
    assert topo == Topology.uniform(2, 4, gpu_memory_gib=80.0) and topo.name == "2x4"
    assert topo.node_of(np.int64(5)) == 1 and topo.ranks_of(np.int32(1)) == range(4, 8)
    assert type(topo.nodes[0].num_gpus) is int and type(topo.nodes[0].gpu_memory_gib) is float
    with pytest.raises(ValueError, match=r"rank np.int64\(8\) is not in \[0, 8\)"):
        topo.node_of(np.int64(8))
    with pytest.raises(ValueError, match="num_gpus of node 'x' must be an integer"):
        Node(name="x", num_gpus=np.float64(2), gpu_memory_gib=1.0)
