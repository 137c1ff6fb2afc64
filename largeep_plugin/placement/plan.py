"""Expert placement: which GPU holds which expert, and which replica each token goes to.

    placement = plan_placement(num_experts, topology, load=load_E, coactivation=coact_EE)
    placement.rank_to_expert                                  # [W] expert on each rank, -1 for none
    placement.destination_ranks(topk_ids_TK, src_rank)       # [T, K] the rank each (token, k) goes to
    placement.figures(load_E, coact_EE, bytes_per_token=2 * hidden)

The planner (``plan_placement``) in steps; docs/placement.md gives the reasoning and the benchmark:
1. expert-TP degree: how many GPUs one expert needs for its memory (1 when it fits);
2. what each slot holds: one replica per expert, spare slots to the hottest experts (proportional to load),
   or, only when asked for, several experts per GPU;
3. where the slots go: greedy seeding plus deterministic local search over swaps between nodes, minimising
   (largest GPU load, largest inter-node link time, total inter-node traffic) in that order.

Shape suffixes: T tokens, K experts per token, E experts, N nodes, W ranks, M replicas of one expert.
"""
from __future__ import annotations

import functools
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from . import search
from .groups import grouped_units
from largeep_plugin.placement.figures import (PlacementFigures, RoutingStats, as_load, link_tokens, make_figures,
                                             route_flows, routing_stats, source_shares)
from largeep_plugin.placement.topology import Topology, as_int, topology_from_dict

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Experts on ranks. Ranks are numbered as in ``topology`` (node by node).

    Fields:
        topology: the cluster.
        num_experts: E.
        rank_to_experts: [W] the experts each rank holds, ascending (``()`` for none; more than one only when
            experts are colocated).
        expert_tp_degree: t, GPUs per copy of an expert (expert tensor parallelism). With t > 1 every replica is
            a block of t consecutive ranks on one node, aligned to the node's first rank, all holding the expert.
    """

    topology: Topology
    num_experts: int
    rank_to_experts: tuple[tuple[int, ...], ...]
    expert_tp_degree: int = 1

    def __post_init__(self) -> None:
        e, t, w = as_int(self.num_experts), as_int(self.expert_tp_degree), self.topology.world_size
        if e is None or e < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {self.num_experts!r}")
        if t is None or t < 1:
            raise ValueError(f"expert_tp_degree must be an integer >= 1, got {self.expert_tp_degree!r}")
        if len(self.rank_to_experts) != w:
            raise ValueError(f"rank_to_experts has {len(self.rank_to_experts)} entries, the topology {w} ranks")
        rank_to_experts = []
        for r, held in enumerate(self.rank_to_experts):
            ids = [as_int(x) for x in held]
            if None in ids or ids != sorted(set(ids)) or not all(0 <= x < e for x in ids):
                raise ValueError(f"rank_to_experts[{r}] must list distinct expert ids in [0, {e}) ascending, "
                                 f"got {held!r}")
            rank_to_experts.append(tuple(ids))
        # Plain ints from here on (the ids may have come as numpy integers): tables, JSON and hashing want them.
        object.__setattr__(self, "num_experts", e)
        object.__setattr__(self, "expert_tp_degree", t)
        object.__setattr__(self, "rank_to_experts", tuple(rank_to_experts))
        missing = sorted(set(range(e)) - {x for held in self.rank_to_experts for x in held})
        if missing:
            raise ValueError(f"experts {missing} are on no rank: every expert must be placed")
        if t > 1:
            if any(len(held) > 1 for held in self.rank_to_experts):
                raise NotImplementedError("colocated experts with expert_tp_degree > 1 are not supported")
            for node in range(self.topology.num_nodes):
                ranks = self.topology.ranks_of(node)
                if len(ranks) % t:
                    raise ValueError(f"expert_tp_degree={t} does not divide the {len(ranks)} GPUs of node {node}")
                for start in ranks[::t]:
                    if len({self.rank_to_experts[r] for r in range(start, start + t)}) != 1:
                        raise ValueError(f"ranks {start}..{start + t - 1} form one expert-TP group and must hold "
                                         f"the same expert")

    # ---- views -------------------------------------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    @property
    def rank_to_expert(self) -> list[int]:
        """[W] the expert each rank holds, -1 for none. Colocated placements have no such list: use
        ``rank_to_experts``."""
        if any(len(held) > 1 for held in self.rank_to_experts):
            raise NotImplementedError("this placement colocates experts on a rank: use rank_to_experts")
        return [held[0] if held else -1 for held in self.rank_to_experts]

    @functools.cached_property
    def expert_to_ranks(self) -> list[list[int]]:
        """[E] the ranks that hold each expert, ascending (with expert TP: t per replica)."""
        out: list[list[int]] = [[] for _ in range(self.num_experts)]
        for r, held in enumerate(self.rank_to_experts):
            for x in held:
                out[x].append(r)
        return out

    def replicas(self, expert: int) -> list[list[int]]:
        """The copies of ``expert``: one list of t ranks (its expert-TP group) per replica."""
        ranks, t = self.expert_to_ranks[expert], self.expert_tp_degree
        return [ranks[i:i + t] for i in range(0, len(ranks), t)]

    @property
    def num_replicas(self) -> list[int]:
        """[E] replicas per expert."""
        return [len(r) // self.expert_tp_degree for r in self.expert_to_ranks]

    @classmethod
    def identity(cls, num_experts: int, topology: Topology | None = None) -> "Placement":
        """Expert r on rank r (one expert per GPU, no replicas); one node of E GPUs unless ``topology`` is given."""
        topo = topology if topology is not None else Topology.uniform(1, num_experts, name=f"1x{num_experts}")
        if topo.world_size != num_experts:
            raise ValueError(f"identity placement needs world_size == num_experts, got {topo.world_size} "
                             f"and {num_experts}")
        return cls(topology=topo, num_experts=num_experts, rank_to_experts=tuple((r,) for r in range(num_experts)))

    # ---- routing -----------------------------------------------------------------------------------------------

    @functools.cached_property
    def _capacity_NE(self) -> torch.Tensor:
        """float64 [N, E] share of expert e's work held on node n (replicas there / replicas)."""
        cap = torch.zeros(self.topology.num_nodes, self.num_experts, dtype=torch.float64)
        for x in range(self.num_experts):
            reps = self.replicas(x)
            for rep in reps:
                cap[self.topology.node_of(rep[0]), x] += 1.0 / len(reps)
        return cap

    @functools.cached_property
    def _source_N(self) -> torch.Tensor:
        return source_shares(self.topology)

    @functools.cached_property
    def _route_tables(self) -> dict[torch.device, tuple[torch.Tensor, torch.Tensor]]:
        """Per device: (cum_NEM float64, rank_NEM int64): for a token from node a choosing expert e, replica m
        (its first rank ``rank_NEM[a, e, m]``) is taken when ``cum[m-1] <= u < cum[m]`` (padding: cum = 2)."""
        flow_NNE = route_flows(self._capacity_NE[None], self._source_N)[0]
        n, e = self._capacity_NE.shape
        m = max(self.num_replicas)
        cum = torch.full((n, e, m), 2.0, dtype=torch.float64)
        first = torch.zeros((n, e, m), dtype=torch.long)
        for x in range(e):
            reps = self.replicas(x)
            nodes = [self.topology.node_of(rep[0]) for rep in reps]
            for a in range(n):
                # the flow into node b is shared evenly by x's replicas there (each has the same fair share)
                probs = [float(flow_NNE[a, b, x]) / (float(self._source_N[a]) * nodes.count(b)) for b in nodes]
                total = 0.0
                for i, (rep, p) in enumerate(zip(reps, probs)):
                    total += p
                    cum[a, x, i] = total
                    first[a, x, i] = rep[0]
                cum[a, x, len(reps) - 1] = 1.0   # rounding must never leave u past the last replica
        return {torch.device("cpu"): (cum, first)}

    def destination_ranks(self, topk_ids_TK: torch.Tensor, src_rank: int, *, token_offset: int = 0) -> torch.Tensor:
        """The rank each (token, k) is sent to.

        Args:
            topk_ids_TK: int64 [T, K] expert ids in [0, E) chosen for the tokens of ``src_rank`` (not checked
                here: checking would sync with the device).
            src_rank: the rank the tokens come from.
            token_offset: index of the first token (for chunks of one batch).
        Returns:
            dest_rank_TK: int64 [T, K] on the device of ``topk_ids_TK``; for an expert-TP replica, its first rank.

        A replica on the source's node is taken first, up to its fair share of the expert's expected load; the
        rest goes to the replicas elsewhere with room, in proportion to that room. The choice among them is a
        hash of (token index, expert, source rank): deterministic, and spreading a hot expert's tokens evenly.
        """
        if topk_ids_TK.dim() != 2 or topk_ids_TK.dtype != torch.long:
            raise ValueError(f"topk_ids_TK must be int64 [T, K], got {tuple(topk_ids_TK.shape)} {topk_ids_TK.dtype}")
        node = self.topology.node_of(src_rank)
        dev = topk_ids_TK.device
        tables = self._route_tables
        if dev not in tables:
            tables[dev] = tuple(x.to(dev) for x in tables[torch.device("cpu")])
        cum_EM, first_EM = tables[dev][0][node], tables[dev][1][node]
        if cum_EM.shape[1] == 1:
            return first_EM[:, 0][topk_ids_TK]            # no replicas: a lookup
        token_T1 = torch.arange(topk_ids_TK.shape[0], device=dev).view(-1, 1) + token_offset
        u_TK = _uniform_hash(token_T1, topk_ids_TK, src_rank)
        pick_TK = (cum_EM[topk_ids_TK] <= u_TK.unsqueeze(-1)).sum(-1)
        return first_EM[topk_ids_TK, pick_TK]

    # ---- figures -----------------------------------------------------------------------------------------------

    def figures(self, load: Any = None, coactivation: Any = None, *, top_k: int | None = None,
                bytes_per_token: float = 1.0) -> PlacementFigures:
        """Tokens per GPU and bytes per inter-node link on the given routing statistics.

        Args:
            load: [E] tokens per expert (None: uniform, one token each).
            coactivation: [E, E] tokens that chose both experts (None: each (token, expert) crosses on its own).
            top_k: experts per token, when known (sharper traffic estimate for top_k > 2).
            bytes_per_token: bytes of one token row on the wire (hidden size x element size); 1 gives tokens.
        """
        if not bytes_per_token > 0:
            raise ValueError(f"bytes_per_token must be > 0, got {bytes_per_token!r}")
        stats = routing_stats(self.num_experts, self.topology, load, coactivation, top_k)
        tokens_NN = link_tokens(route_flows(self._capacity_NE[None], self._source_N), stats)[0]
        load_E = stats.load_E
        gpu_W = torch.zeros(self.world_size, dtype=torch.float64)
        for x in range(self.num_experts):
            reps = self.replicas(x)
            for rep in reps:
                gpu_W[rep] += float(load_E[x]) / len(reps) / len(rep)
        n = self.topology.num_nodes
        links = [[self.topology.link(a, b) for b in range(n)] for a in range(n)]
        bandwidth = torch.tensor([[lk.bandwidth_gbytes_per_s * 1e9 for lk in row] for row in links])
        latency = torch.tensor([[lk.latency_us * 1e-6 for lk in row] for row in links])
        return make_figures(gpu_load_W=gpu_W, link_tokens_NN=tokens_NN, bandwidth_NN=bandwidth,
                            latency_NN=latency, bytes_per_token=float(bytes_per_token))

    # ---- files -------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"num_experts": self.num_experts, "expert_tp_degree": self.expert_tp_degree,
                "rank_to_experts": [list(h) for h in self.rank_to_experts], "expert_to_ranks": self.expert_to_ranks,
                "topology": self.topology.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Placement":
        """Read back ``to_dict`` (``expert_to_ranks`` is derived and ignored)."""
        unknown = sorted(set(d) - {"num_experts", "expert_tp_degree", "rank_to_experts", "expert_to_ranks",
                                   "topology"})
        if unknown:
            raise ValueError(f"placement: unknown key(s) {unknown}")
        for key in ("num_experts", "rank_to_experts", "topology"):
            if key not in d:
                raise ValueError(f"placement: missing key {key!r}")
        return cls(topology=topology_from_dict(d["topology"]), num_experts=d["num_experts"],
                   rank_to_experts=tuple(tuple(h) for h in d["rank_to_experts"]),
                   expert_tp_degree=d.get("expert_tp_degree", 1))


def _uniform_hash(token_T1: torch.Tensor, ids_TK: torch.Tensor, src_rank: int) -> torch.Tensor:
    """float64 [T, K] in [0, 1): an integer hash of (token, expert, source rank), the same on every device.
    32-bit arithmetic kept inside int64 so that no product overflows."""
    x = ((token_T1 & 0x7FFFFFFF) * 0x9E3779B1 + ids_TK * 0x85EBCA77 + src_rank * 0xC2B2AE3D) & _MASK32
    for _ in range(2):
        x = x ^ (x >> 16)
        x = (x * 0x45D9F3B) & _MASK32
    x = x ^ (x >> 16)
    return x.to(torch.float64) / float(1 << 32)


# ---- the planner -----------------------------------------------------------------------------------------------

def expert_tp_degree(expert_bytes: int | None, topology: Topology) -> int:
    """Step 1: GPUs one expert needs for its memory: the smallest t >= expert_bytes / (smallest GPU memory) that
    divides the GPU count of every node (an expert-TP group stays inside one node). 1 when ``expert_bytes`` is None.
    """
    if expert_bytes is None:
        return 1
    if not isinstance(expert_bytes, numbers.Real) or isinstance(expert_bytes, bool) or not expert_bytes > 0:
        raise ValueError(f"expert_bytes must be a number > 0, got {expert_bytes!r}")
    memory = min(topology.gpu_memory_bytes(r) for r in range(topology.world_size))
    need = math.ceil(expert_bytes / memory)
    sizes = [n.num_gpus for n in topology.nodes]
    for t in range(need, min(sizes) + 1):
        if all(g % t == 0 for g in sizes):
            return t
    raise ValueError(f"expert_bytes={expert_bytes} needs {need} GPUs of {memory} bytes, but no expert-TP degree "
                     f">= {need} divides every node's GPU count {sizes}")


def plan_placement(num_experts: int, topology: Topology, load: Any = None, coactivation: Any = None,
                   expert_bytes: int | None = None, allow_colocate: bool = False, *, top_k: int | None = None,
                   kicks: int = 20, seed: int = 0, expert_groups: int | None = None) -> Placement:
    """Plan where experts go.

    Args:
        num_experts: E.
        topology: the cluster.
        load: [E] tokens per expert (list or tensor; None: uniform).
        coactivation: [E, E] tokens that chose both experts (None: experts assumed independent of each other
            for traffic, each (token, expert) pair counted on its own).
        expert_bytes: bytes one expert needs on a GPU (weights, gradients, optimizer state); the whole GPU memory
            is the limit, so include a margin. None: it fits.
        allow_colocate: with more experts than GPUs, put several experts on a GPU (warns) instead of refusing.
        top_k: experts per token the statistics were recorded with (sharper traffic estimate for top_k > 2).
        kicks, seed: rounds and seed of the local search's random restarts (fixed: the same input gives the same
            placement).
        expert_groups: G routing groups (``LargeEPConfig.num_groups``; expert e in group e // (E / G)): keep each
            group, replicas included, on one node (placement/groups.py), so a token that keeps M groups reaches
            at most M nodes. Steps 2-3 then run per node; the baselines, which split groups, are not candidates.
    Returns:
        The Placement with the best (largest GPU load, largest inter-node link time, total inter-node traffic)
        among the planner's own layout and the naive, Megatron-style and EPLB-style layouts it starts from.
    """
    given, num_experts = num_experts, as_int(num_experts)
    if num_experts is None or num_experts < 1:
        raise ValueError(f"num_experts must be an integer >= 1, got {given!r}")
    if coactivation is not None and load is None:
        raise ValueError("coactivation needs the load it was recorded with: pass load as well")
    stats = routing_stats(num_experts, topology, load, coactivation, top_k)
    load_E = stats.load_E

    # step 1: expert-TP degree, and the slots it leaves (one per t GPUs)
    tp = expert_tp_degree(expert_bytes, topology)
    units_per_node = tuple(n.num_gpus // tp for n in topology.nodes)
    slots = sum(units_per_node)

    if expert_groups is not None:  # steps 2-3 under the constraint: every routing group on one node
        if num_experts > slots and tp > 1:
            raise NotImplementedError("colocated experts with expert tensor parallelism are not supported")
        unit_experts, nodes = grouped_units(load_E, expert_groups, units_per_node, allow_colocate)
        if num_experts > slots:
            warnings.warn(f"placing {num_experts} experts on {slots} GPUs: up to "
                          f"{max(len(u) for u in unit_experts)} experts share a GPU", stacklevel=2)
        return assemble_placement(topology, num_experts, tp, unit_experts, nodes)

    # step 2: what each slot holds
    if num_experts <= slots:
        counts = search.replica_counts(load_E, slots)
        unit_experts = [(x,) for x in range(num_experts) for _ in range(counts[x])]
    else:
        if not allow_colocate:
            raise ValueError(f"num_experts={num_experts} > {slots} GPUs: one expert per GPU is impossible; pass "
                             f"allow_colocate=True to put several experts on one GPU")
        if tp > 1:
            raise NotImplementedError("colocated experts with expert tensor parallelism are not supported")
        per_gpu = math.ceil(num_experts / slots)
        if expert_bytes is not None and per_gpu * expert_bytes > min(
                topology.gpu_memory_bytes(r) for r in range(topology.world_size)):
            raise ValueError(f"{per_gpu} colocated experts of expert_bytes={expert_bytes} do not fit in one GPU")
        warnings.warn(f"placing {num_experts} experts on {slots} GPUs: up to {per_gpu} experts share a GPU",
                      stacklevel=2)
        unit_experts = search.colocated_bins(load_E, slots)

    # step 3: where the slots go; seeds are a greedy construction and the baselines
    problem = layout_problem(unit_experts, units_per_node, topology, stats)
    slot_nodes = problem.slot_nodes()
    baselines = [search.naive_slots(num_experts, slots), search.megatron_slots(num_experts, slots),
                 search.eplb_slots(load_E, units_per_node)]
    seeds = [search.greedy_layout(problem)] + [search.project_layout(unit_experts, b, slot_nodes) for b in baselines]
    ours = search.iterated_local_search(problem, unit_experts, seeds, kicks=kicks, seed=seed)

    # step 4: keep the baselines as candidates too, so the plan is never worse than them
    candidates = [(unit_experts, ours)] + [(b, slot_nodes) for b in baselines]
    scores = []
    for experts, nodes in candidates:
        p = problem if experts is unit_experts else layout_problem(experts, units_per_node, topology, stats)
        gpu_max = float((p.share_UE @ load_E).max()) / tp
        scores.append(torch.cat([torch.tensor([gpu_max], dtype=torch.float64), p.cost(nodes[None])[0]]))
    experts, nodes = candidates[search.best_index(torch.stack(scores))]
    return assemble_placement(topology, num_experts, tp, experts, nodes)


def layout_problem(unit_experts: Sequence[tuple[int, ...]], units_per_node: tuple[int, ...], topology: Topology,
                   stats: RoutingStats) -> search.LayoutProblem:
    """The search problem of placing ``unit_experts`` (what each slot holds) on the nodes of ``topology``."""
    n = topology.num_nodes
    share = torch.zeros(len(unit_experts), stats.load_E.numel(), dtype=torch.float64)
    for u, held in enumerate(unit_experts):
        share[u, list(held)] = 1.0
    share = share / share.sum(0, keepdim=True)          # each replica holds 1 / replicas of its expert
    inv_bw = torch.tensor([[0.0 if a == b else 1.0 / topology.link(a, b).bandwidth_gbytes_per_s
                            for b in range(n)] for a in range(n)], dtype=torch.float64)
    return search.LayoutProblem(share_UE=share, units_per_node=units_per_node, stats=stats, inv_bandwidth_NN=inv_bw)


def assemble_placement(topology: Topology, num_experts: int, tp: int, unit_experts: Sequence[tuple[int, ...]],
              node_of_unit_U: torch.Tensor) -> Placement:
    """Turn units-on-nodes into ranks: inside a node, units in order of their expert ids, t ranks each."""
    rank_to_experts: list[tuple[int, ...]] = [()] * topology.world_size
    for node in range(topology.num_nodes):
        units = sorted((unit_experts[u] for u in range(len(unit_experts)) if int(node_of_unit_U[u]) == node))
        ranks = topology.ranks_of(node)
        for i, held in enumerate(units):
            for r in ranks[i * tp:(i + 1) * tp]:
                rank_to_experts[r] = tuple(held)
    return Placement(topology=topology, num_experts=num_experts, rank_to_experts=tuple(rank_to_experts),
                     expert_tp_degree=tp)


def naive_placement(num_experts: int, topology: Topology) -> Placement:
    """Baseline: contiguous, uniform replicas (slot s holds expert s mod E), or contiguous blocks when colocated."""
    return _one_per_gpu(topology, num_experts, search.naive_slots(num_experts, topology.world_size))


def megatron_placement(num_experts: int, topology: Topology) -> Placement:
    """Baseline: Megatron-Core's layout, an EP group of E consecutive ranks copied data-parallel (rank r holds
    expert r mod E)."""
    return _one_per_gpu(topology, num_experts, search.megatron_slots(num_experts, topology.world_size))


def eplb_placement(num_experts: int, topology: Topology, load: Any = None) -> Placement:
    """Baseline: EPLB-style hierarchical packing by load (experts to nodes, then replicas to GPUs)."""
    units_per_node = tuple(n.num_gpus for n in topology.nodes)
    return _one_per_gpu(topology, num_experts, search.eplb_slots(as_load(load, num_experts), units_per_node))


def _one_per_gpu(topology: Topology, num_experts: int, slots: Sequence[tuple[int, ...]]) -> Placement:
    """A Placement from slot contents in rank order (expert-TP degree 1)."""
    return assemble_placement(topology, num_experts, 1, slots, torch.tensor(topology.node_of_rank()))
