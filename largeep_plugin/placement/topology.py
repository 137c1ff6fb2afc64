"""The cluster a MoE layer runs on: nodes, GPUs per node, links and GPU memory.

Ranks are numbered node by node: node 0 holds ranks ``0 .. g0-1``, node 1 the next ``g1`` ranks, and so on (the
order ``torchrun`` gives with one process per GPU). Every GPU of a node has the node's memory; GPUs inside a node
talk over ``intra_node`` (NVLink), nodes over ``inter_node`` (InfiniBand / Ethernet) unless a node pair has its
own entry in ``link_overrides``.

Units: bandwidth in gigabytes (1e9 bytes) per second *per direction*; an inter-node figure is the bandwidth from
one node to another with all its NICs together (8 x 400 Gb/s InfiniBand = 400 GB/s). Latency in microseconds.
GPU memory in GiB (2**30 bytes).

Two ways to get one:

    load_topology("examples/topologies/2x8_h100.yaml")   # from YAML, format in docs/placement.md
    topology_from_env()                                  # from WORLD_SIZE and LOCAL_WORLD_SIZE (torchrun)
"""
from __future__ import annotations

import bisect
import math
import numbers
import operator
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from .files import read_yaml

GIB = 2**30


def as_int(value: Any) -> int | None:
    """``value`` as a plain int when it is an integer of any type (numpy's too, through ``operator.index``, so the
    core needs no numpy), else None: a bool is not a count, nor is a float."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _is_number(x: Any) -> bool:
    # numbers.Real: numpy's scalars register themselves there, so they pass without importing numpy.
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _plain(x: float) -> float:
    """A Python number for a numpy scalar: to_dict's JSON and YAML know only those."""
    return x if type(x) in (int, float) else float(x)


def _positive(name: str, x: Any) -> None:
    if not _is_number(x) or not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {x!r}")


@dataclass(frozen=True, kw_only=True)
class Link:
    """One direction of a connection. ``bandwidth_gbytes_per_s`` > 0, ``latency_us`` >= 0."""

    bandwidth_gbytes_per_s: float
    latency_us: float = 0.0

    def __post_init__(self) -> None:
        _positive("bandwidth_gbytes_per_s", self.bandwidth_gbytes_per_s)
        if not _is_number(self.latency_us) or not math.isfinite(self.latency_us) or self.latency_us < 0:
            raise ValueError(f"latency_us must be a finite number >= 0, got {self.latency_us!r}")
        object.__setattr__(self, "bandwidth_gbytes_per_s", _plain(self.bandwidth_gbytes_per_s))
        object.__setattr__(self, "latency_us", _plain(self.latency_us))

    def seconds(self, num_bytes: float) -> float:
        """Time to move ``num_bytes`` over this link in one message: latency + bytes / bandwidth."""
        return self.latency_us * 1e-6 + num_bytes / (self.bandwidth_gbytes_per_s * 1e9)


@dataclass(frozen=True, kw_only=True)
class Node:
    """One machine: ``num_gpus`` GPUs with ``gpu_memory_gib`` GiB each."""

    name: str
    num_gpus: int
    gpu_memory_gib: float

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"node name must be a non-empty string, got {self.name!r}")
        num_gpus = as_int(self.num_gpus)
        if num_gpus is None or num_gpus < 1:
            raise ValueError(f"num_gpus of node {self.name!r} must be an integer >= 1, got {self.num_gpus!r}")
        _positive(f"gpu_memory_gib of node {self.name!r}", self.gpu_memory_gib)
        object.__setattr__(self, "num_gpus", num_gpus)
        object.__setattr__(self, "gpu_memory_gib", _plain(self.gpu_memory_gib))


# Defaults of ``Topology.uniform`` and ``topology_from_env``: an H100 node (NVLink 4: 450 GB/s per direction per
# GPU; 8 x 400 Gb/s InfiniBand = 400 GB/s per node and direction; 80 GiB per GPU).
H100_NVLINK = Link(bandwidth_gbytes_per_s=450.0, latency_us=1.0)
H100_INFINIBAND = Link(bandwidth_gbytes_per_s=400.0, latency_us=5.0)
H100_MEMORY_GIB = 80.0


@dataclass(frozen=True, kw_only=True)
class Topology:
    """Nodes, links and memory of a cluster. Build with ``load_topology``, ``topology_from_env`` or ``uniform``.

    Args:
        nodes: the nodes in rank order.
        intra_node: the link between two GPUs of one node.
        inter_node: the link from one node to another (per direction, all NICs of the node together).
        link_overrides: ``(node_a, node_b, link)`` entries that replace ``inter_node`` for that pair, in both
            directions (a slower rack uplink, a node with fewer NICs).
        name: a label for printouts.
    """

    nodes: tuple[Node, ...]
    intra_node: Link
    inter_node: Link
    link_overrides: tuple[tuple[int, int, Link], ...] = ()
    name: str = "topology"
    _first_rank: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.nodes, tuple) or not self.nodes:
            raise ValueError(f"nodes must be a non-empty tuple of Node, got {self.nodes!r}")
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise ValueError(f"node names must be unique, got {names}")
        seen: set[tuple[int, int]] = set()
        overrides = []
        for a_in, b_in, link in self.link_overrides:
            a, b = as_int(a_in), as_int(b_in)
            for end, given in ((a, a_in), (b, b_in)):
                if end is None or not 0 <= end < len(self.nodes):
                    raise ValueError(f"link_overrides: node index {given!r} is not in [0, {len(self.nodes)})")
            overrides.append((a, b, link))
            if a == b:
                raise ValueError(f"link_overrides: a link joins two different nodes, got ({a}, {b})")
            pair = (min(a, b), max(a, b))
            if pair in seen:
                raise ValueError(f"link_overrides: node pair {pair} is given twice")
            seen.add(pair)
        object.__setattr__(self, "link_overrides", tuple(overrides))
        starts = [0]
        for n in self.nodes[:-1]:
            starts.append(starts[-1] + n.num_gpus)
        object.__setattr__(self, "_first_rank", tuple(starts))

    @classmethod
    def uniform(cls, num_nodes: int, gpus_per_node: int, *, intra_node: Link = H100_NVLINK,
                inter_node: Link = H100_INFINIBAND, gpu_memory_gib: float = H100_MEMORY_GIB,
                name: str | None = None) -> "Topology":
        """``num_nodes`` identical nodes of ``gpus_per_node`` GPUs (H100 links and memory unless given)."""
        count = as_int(num_nodes)
        if count is None or count < 1:
            raise ValueError(f"num_nodes must be an integer >= 1, got {num_nodes!r}")
        nodes = tuple(Node(name=f"node{i}", num_gpus=gpus_per_node, gpu_memory_gib=gpu_memory_gib)
                      for i in range(count))
        return cls(nodes=nodes, intra_node=intra_node, inter_node=inter_node,
                   name=name or f"{count}x{nodes[0].num_gpus}")

    @property
    def world_size(self) -> int:
        """The number of GPUs (ranks)."""
        return sum(n.num_gpus for n in self.nodes)

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    def node_of(self, rank: int) -> int:
        """The index of the node that holds ``rank``."""
        return bisect.bisect_right(self._first_rank, self._check_rank(rank)) - 1

    def ranks_of(self, node: int) -> range:
        """The ranks of node ``node``."""
        index = as_int(node)
        if index is None or not 0 <= index < self.num_nodes:
            raise ValueError(f"node {node!r} is not in [0, {self.num_nodes})")
        start = self._first_rank[index]
        return range(start, start + self.nodes[index].num_gpus)

    def node_of_rank(self) -> tuple[int, ...]:
        """Node index of every rank, [world_size]."""
        return tuple(i for i, n in enumerate(self.nodes) for _ in range(n.num_gpus))

    def link(self, node_a: int, node_b: int) -> Link:
        """The link from ``node_a`` to ``node_b`` (``intra_node`` when they are the same node)."""
        if node_a == node_b:
            return self.intra_node
        for a, b, link in self.link_overrides:
            if {a, b} == {node_a, node_b}:
                return link
        return self.inter_node

    def gpu_memory_bytes(self, rank: int) -> int:
        """Memory of the GPU that runs ``rank``, in bytes."""
        return int(self.nodes[self.node_of(rank)].gpu_memory_gib * GIB)

    def to_dict(self) -> dict[str, Any]:
        """The YAML/JSON form that ``topology_from_dict`` reads back."""
        def link_dict(link: Link) -> dict[str, float]:
            return {"bandwidth_gbytes_per_s": link.bandwidth_gbytes_per_s, "latency_us": link.latency_us}
        return {
            "name": self.name,
            "nodes": [{"name": n.name, "gpus": n.num_gpus, "gpu_memory_gib": n.gpu_memory_gib} for n in self.nodes],
            "intra_node": link_dict(self.intra_node),
            "inter_node": link_dict(self.inter_node),
            "links": [{"between": [self.nodes[a].name, self.nodes[b].name], **link_dict(link)}
                      for a, b, link in self.link_overrides],
        }

    def _check_rank(self, rank: int) -> int:
        index = as_int(rank)
        if index is None or not 0 <= index < self.world_size:
            raise ValueError(f"rank {rank!r} is not in [0, {self.world_size})")
        return index


def _check_keys(where: str, d: Any, allowed: set[str], required: set[str]) -> None:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(d).__name__}: {d!r}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(required - set(d))
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")


_LINK_KEYS = {"bandwidth_gbytes_per_s", "latency_us"}


def _link_from_dict(where: str, d: Any) -> Link:
    _check_keys(where, d, _LINK_KEYS, {"bandwidth_gbytes_per_s"})
    try:
        return Link(**d)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def topology_from_dict(d: Mapping[str, Any]) -> Topology:
    """A Topology from its dict form (the YAML file's content); see docs/placement.md for the format.

    Nodes are either ``nodes: N`` with ``gpus_per_node`` and ``gpu_memory_gib``, or a list of
    ``{name, gpus, gpu_memory_gib}`` entries (for clusters whose nodes differ).
    """
    _check_keys("topology", d, {"name", "nodes", "gpus_per_node", "gpu_memory_gib", "intra_node", "inter_node",
                                "links"}, {"nodes", "intra_node", "inter_node"})
    nodes_spec = d["nodes"]
    if as_int(nodes_spec) is not None:
        nodes_spec = as_int(nodes_spec)
        if nodes_spec < 1:
            raise ValueError(f"topology.nodes must be >= 1, got {nodes_spec}")
        for key in ("gpus_per_node", "gpu_memory_gib"):
            if key not in d:
                raise ValueError(f"topology: nodes is a count ({nodes_spec}), so {key} is required")
        nodes = tuple(Node(name=f"node{i}", num_gpus=d["gpus_per_node"], gpu_memory_gib=d["gpu_memory_gib"])
                      for i in range(nodes_spec))
    elif isinstance(nodes_spec, list) and nodes_spec:
        if "gpus_per_node" in d:
            raise ValueError("topology: gpus_per_node goes with a node count; with a node list give gpus per node")
        nodes_list = []
        for i, nd in enumerate(nodes_spec):
            _check_keys(f"topology.nodes[{i}]", nd, {"name", "gpus", "gpu_memory_gib"}, {"gpus"})
            memory = nd.get("gpu_memory_gib", d.get("gpu_memory_gib"))
            if memory is None:
                raise ValueError(f"topology.nodes[{i}]: gpu_memory_gib is missing (give it per node or at the top)")
            nodes_list.append(Node(name=str(nd.get("name", f"node{i}")), num_gpus=nd["gpus"], gpu_memory_gib=memory))
        nodes = tuple(nodes_list)
    else:
        raise ValueError(f"topology.nodes must be a node count or a non-empty list of nodes, got {nodes_spec!r}")

    index = {n.name: i for i, n in enumerate(nodes)}
    overrides = []
    for i, ld in enumerate(d.get("links") or []):
        where = f"topology.links[{i}]"
        _check_keys(where, ld, _LINK_KEYS | {"between"}, {"between", "bandwidth_gbytes_per_s"})
        between = ld["between"]
        if not isinstance(between, list) or len(between) != 2:
            raise ValueError(f"{where}.between must list two nodes (names or indices), got {between!r}")
        ends = []
        for end in between:
            if isinstance(end, str):
                if end not in index:
                    raise ValueError(f"{where}.between: unknown node {end!r}; nodes are {sorted(index)}")
                ends.append(index[end])
            else:
                ends.append(end)
        link = _link_from_dict(where, {k: v for k, v in ld.items() if k != "between"})
        overrides.append((ends[0], ends[1], link))
    return Topology(nodes=nodes, intra_node=_link_from_dict("topology.intra_node", d["intra_node"]),
                    inter_node=_link_from_dict("topology.inter_node", d["inter_node"]),
                    link_overrides=tuple(overrides), name=str(d.get("name", "topology")))


def load_topology(path: str | os.PathLike) -> Topology:
    """Read a Topology from a YAML file (format in docs/placement.md)."""
    data = read_yaml(path)
    try:
        return topology_from_dict(data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def topology_from_env(environ: Mapping[str, str] | None = None, *, intra_node: Link = H100_NVLINK,
                      inter_node: Link = H100_INFINIBAND, gpu_memory_gib: float = H100_MEMORY_GIB) -> Topology:
    """A uniform Topology from ``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE`` (as set by torchrun).

    The environment says nothing about links and memory: they are the keyword arguments (H100 figures unless
    given). ``environ`` defaults to ``os.environ``.
    """
    env = os.environ if environ is None else environ
    values = {}
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        if key not in env:
            raise ValueError(f"topology_from_env: environment variable {key} is not set")
        try:
            values[key] = int(env[key])
        except ValueError:
            raise ValueError(f"topology_from_env: {key} must be an integer, got {env[key]!r}") from None
        if values[key] < 1:
            raise ValueError(f"topology_from_env: {key} must be >= 1, got {values[key]}")
    world, local = values["WORLD_SIZE"], values["LOCAL_WORLD_SIZE"]
    if world % local:
        raise ValueError(f"topology_from_env: WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local}")
    return Topology.uniform(world // local, local, intra_node=intra_node, inter_node=inter_node,
                            gpu_memory_gib=gpu_memory_gib, name=f"env-{world // local}x{local}")
