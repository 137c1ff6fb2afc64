"""Building blocks of the placement planner: replica counts, baselines, seeding and local search.

Pure functions on CPU tensors and lists. The planner works on *units*: what one slot holds, where a slot is one
GPU (or one expert-TP group of GPUs). A unit holds one replica of an expert, or several experts when they are
colocated. A layout says which node each unit sits on (``node_of_unit_U``); which GPU inside the node does not
change any figure, because intra-node traffic is not scored.

Shape suffixes: B candidate layouts, U units (= slots), N nodes, E experts.
"""
from __future__ import annotations

import functools
import heapq
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from largeep_plugin.placement.figures import RoutingStats, crossings, link_tokens, route_flows

_REL_TOL = 1e-9      # two costs closer than this (relative) are ties: keeps the search from chasing rounding
_MAX_BATCH_ELEMS = 1 << 22   # layouts scored at once are cut so that B * N * N * E stays below this


@dataclass(frozen=True, kw_only=True, eq=False)
class LayoutProblem:
    """What the search scores: the units, the nodes' room for them and the routing statistics.

    Fields:
        share_UE: float64 [U, E], share of expert e's work held by unit u (1 / replicas of e, or 1 when colocated).
        units_per_node: [N] how many units each node holds (its GPUs / expert-TP degree).
        stats: load, co-activation, top-k and source shares.
        inv_bandwidth_NN: float64 [N, N], 1 / bandwidth of each inter-node link (any unit), 0 on the diagonal.
    """

    share_UE: torch.Tensor
    units_per_node: tuple[int, ...]
    stats: RoutingStats
    inv_bandwidth_NN: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return len(self.units_per_node)

    def slot_nodes(self) -> torch.Tensor:
        """[U] node of each slot in slot order (node 0's slots first): the layout "unit u in slot u"."""
        return torch.repeat_interleave(torch.arange(self.num_nodes), torch.tensor(self.units_per_node))

    def _link_cost(self, tokens_BNN: torch.Tensor) -> torch.Tensor:
        worst = (tokens_BNN * self.inv_bandwidth_NN).amax(dim=(1, 2))
        return torch.stack([worst, tokens_BNN.sum(dim=(1, 2))], dim=1)

    def cost(self, node_of_unit_BU: torch.Tensor) -> torch.Tensor:
        """Score layouts: [B, 2] = (largest link time, total inter-node tokens); lower is better, compared in order.

        ``node_of_unit_BU`` (int64 [B, U]) may hold N for a unit not placed yet (its work is left out).
        """
        n, e = self.num_nodes, self.share_UE.shape[1]
        out = []
        for chunk in node_of_unit_BU.split(max(1, _MAX_BATCH_ELEMS // (n * n * e))):
            onehot_BUN = F.one_hot(chunk, n + 1)[..., :n].to(torch.float64)
            capacity_BNE = torch.einsum("bun,ue->bne", onehot_BUN, self.share_UE)
            flow_BNNE = route_flows(capacity_BNE, self.stats.source_N)
            out.append(self._link_cost(link_tokens(flow_BNNE, self.stats)))
        return torch.cat(out)

    @functools.cached_property
    def _unit_experts_UD(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [U, D] int64, mask [U, D] bool): the experts each unit holds, padded to the fullest unit."""
        held = [torch.nonzero(row).flatten() for row in self.share_UE]
        d = max(h.numel() for h in held)
        ids = torch.zeros(len(held), d, dtype=torch.long)
        mask = torch.zeros(len(held), d, dtype=torch.bool)
        for u, h in enumerate(held):
            ids[u, :h.numel()], mask[u, :h.numel()] = h, True
        return ids, mask

    def swap_costs(self, node_of_unit_U: torch.Tensor, pairs_P2: torch.Tensor) -> torch.Tensor:
        """``cost`` of the layouts that swap each pair of units (on different nodes), [P, 2].

        Same numbers as ``cost`` on the swapped layouts, computed from the change in the few experts the two
        units hold: m1 moves by their flow change, m2 by 2 * dF . (C F) + dF . C dF.
        """
        n, st = self.num_nodes, self.stats
        capacity_NE = F.one_hot(node_of_unit_U, n).to(torch.float64).T @ self.share_UE
        flow_NNE = route_flows(capacity_NE[None], st.source_N)[0]
        m1_NN = flow_NNE @ st.load_E
        pairs_EE = st.pairs_EE
        if pairs_EE is not None:
            cf_NNE = flow_NNE @ pairs_EE
            m2_NN = (flow_NNE * cf_NNE).sum(-1) / st.source_N.view(-1, 1)
        ids_UD, mask_UD = self._unit_experts_UD
        out = []
        for pairs in pairs_P2.split(max(1, _MAX_BATCH_ELEMS // (n * n * 2 * ids_UD.shape[1]))):
            i, j = pairs[:, 0], pairs[:, 1]
            ids = torch.cat([ids_UD[i], ids_UD[j]], dim=1)                       # [P, D] experts that move
            mask = torch.cat([mask_UD[i], mask_UD[j]], dim=1).to(torch.float64)
            moved = (self.share_UE[j[:, None], ids] - self.share_UE[i[:, None], ids]) * mask  # into node of i
            step_PN = F.one_hot(node_of_unit_U[i], n).to(torch.float64) - F.one_hot(node_of_unit_U[j], n)
            col_PND = capacity_NE.T[ids].transpose(1, 2) + step_PN[:, :, None] * moved[:, None, :]
            d_flow = (route_flows(col_PND, st.source_N) - flow_NNE[:, :, ids].permute(2, 0, 1, 3)) \
                * mask[:, None, None, :]                                           # [P, N, N, D]
            m1 = m1_NN + torch.einsum("pabd,pd->pab", d_flow, st.load_E[ids])
            m2 = None
            if pairs_EE is not None:
                c_PDD = pairs_EE[ids[:, :, None], ids[:, None, :]]
                dm2 = 2 * (d_flow * cf_NNE[:, :, ids].permute(2, 0, 1, 3)).sum(-1) \
                    + (torch.einsum("pabd,pde->pabe", d_flow, c_PDD) * d_flow).sum(-1)
                m2 = m2_NN + dm2 / st.source_N.view(1, -1, 1)
            out.append(self._link_cost(crossings(m1, m2, st)))
        return torch.cat(out)


def best_index(cost_BC: torch.Tensor) -> int:
    """Index of the best row of ``cost_BC`` (lexicographic: smallest first column, ties within tolerance by the
    next column, then by position), so the choice is deterministic."""
    alive = torch.ones(cost_BC.shape[0], dtype=torch.bool)
    for col in cost_BC.T:
        col = torch.where(alive, col, torch.full_like(col, math.inf))
        alive &= col <= col.min() * (1 + _REL_TOL) + 1e-300
    return int(torch.nonzero(alive)[0].item())


def improves(new_C: torch.Tensor, old_C: torch.Tensor) -> bool:
    """Whether cost ``new_C`` is better than ``old_C`` by more than the tolerance (lexicographic)."""
    for new, old in zip(new_C.tolist(), old_C.tolist()):
        if new < old * (1 - _REL_TOL) - 1e-300:
            return True
        if new > old * (1 + _REL_TOL) + 1e-300:
            return False
    return False


# ---------------------------------------------------------------------------------------------------------------
# Step 1: what the units hold.

def replica_counts(load_E: torch.Tensor, num_slots: int) -> list[int]:
    """Replicas per expert when slots >= experts: one each, then every spare slot to the expert with the largest
    load per replica (ties: lowest id). This minimises max_e load_e / replicas_e, the per-GPU load once every
    replica gets its fair share, over all integer counts (a D'Hondt apportionment: proportional to load).

    Args: load_E [E] tokens per expert; num_slots >= E. Returns: [E] replica counts summing to num_slots.
    """
    load = load_E.tolist()
    counts = [1] * len(load)
    heap = [(-x, e) for e, x in enumerate(load)]
    heapq.heapify(heap)
    for _ in range(num_slots - len(load)):
        _, e = heapq.heappop(heap)
        counts[e] += 1
        heapq.heappush(heap, (-load[e] / counts[e], e))
    return counts


def balanced_packing(weights: list[float], capacities: list[int]) -> list[int]:
    """EPLB's balanced packing, with a room per pack: items by decreasing weight (ties: lowest index), each into
    the lightest pack that still has room (ties: lowest pack). Returns the pack of every item [len(weights)]."""
    if sum(capacities) < len(weights):
        raise ValueError(f"capacities {capacities} hold fewer than {len(weights)} items")
    pack_weight = [0.0] * len(capacities)
    pack_count = [0] * len(capacities)
    out = [0] * len(weights)
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        p = min((p for p in range(len(capacities)) if pack_count[p] < capacities[p]),
                key=lambda p: (pack_weight[p], p))
        out[i] = p
        pack_weight[p] += weights[i]
        pack_count[p] += 1
    return out


def colocated_bins(load_E: torch.Tensor, num_slots: int) -> list[tuple[int, ...]]:
    """Experts > slots: pack the experts into ``num_slots`` GPUs of at most ceil(E / slots) experts each,
    balancing load (``balanced_packing``). Returns [num_slots] tuples of expert ids."""
    e = load_E.numel()
    cap = math.ceil(e / num_slots)
    packs = balanced_packing(load_E.tolist(), [cap] * num_slots)
    return [tuple(x for x in range(e) if packs[x] == s) for s in range(num_slots)]


# ---------------------------------------------------------------------------------------------------------------
# Baselines: slot contents in slot order (node 0's slots first).

def naive_slots(num_experts: int, num_slots: int) -> list[tuple[int, ...]]:
    """Contiguous placement: experts in id order over the slots in rank order, each expert on a block of
    neighbouring slots (uniform replicas: slot s holds expert floor(s * E / slots)), or a block of experts per
    slot when they are colocated."""
    if num_experts <= num_slots:
        return [(s * num_experts // num_slots,) for s in range(num_slots)]
    return [tuple(range(s * num_experts // num_slots, (s + 1) * num_experts // num_slots)) for s in range(num_slots)]


def megatron_slots(num_experts: int, num_slots: int) -> list[tuple[int, ...]]:
    """Megatron-Core's layout: an EP group of E consecutive ranks, copied data-parallel (slot s holds expert
    s mod E). With E dividing a node's GPUs every node holds every expert, so nothing crosses nodes, but a hot
    expert's GPUs carry its whole skew. Colocated: the contiguous blocks of ``naive_slots``."""
    if num_experts > num_slots:
        return naive_slots(num_experts, num_slots)
    return [(s % num_experts,) for s in range(num_slots)]


def eplb_slots(load_E: torch.Tensor, units_per_node: tuple[int, ...]) -> list[tuple[int, ...]]:
    """EPLB-style hierarchical packing (DeepSeek's ``rebalance_experts_hierarchical``, one expert per group).

    step 1: pack experts onto nodes balancing load, the same number of experts per node;
    step 2: inside each node, give its spare slots to replicas of its own experts (largest load per replica);
    step 3: pack the node's replicas onto its GPUs balancing load (one per GPU unless colocated).
    Like EPLB, it falls back to its global policy (one "node" holding everything) when the nodes differ in size
    or the experts do not divide evenly among the nodes.
    """
    load = load_E.tolist()
    e, n, slots = len(load), len(units_per_node), sum(units_per_node)
    if len(set(units_per_node)) != 1 or e % n:
        units_per_node, n = (slots,), 1
    # step 1: experts onto nodes
    node_of = balanced_packing(load, [e // n] * n)
    out: list[tuple[int, ...]] = []
    for node in range(n):
        experts = [x for x in range(e) if node_of[x] == node]
        room = units_per_node[node]
        if len(experts) <= room:
            # step 2: node-local replicas; step 3: replicas onto GPUs, heaviest per-replica load first
            counts = replica_counts(load_E[experts], room)
            replicas = [(x, load[x] / c) for x, c in zip(experts, counts) for _ in range(c)]
            gpu_of = balanced_packing([w for _, w in replicas], [1] * room)
            by_gpu = sorted(zip(gpu_of, replicas))
            out.extend((x,) for _, (x, _) in by_gpu)
        else:
            # step 3 with colocation: several experts per GPU
            packs = balanced_packing([load[x] for x in experts], [math.ceil(len(experts) / room)] * room)
            out.extend(tuple(x for x, p in zip(experts, packs) if p == g) for g in range(room))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Steps 2-3: seed layouts and improve them with pairwise swaps.

def project_layout(unit_experts: list[tuple[int, ...]], slots: list[tuple[int, ...]],
                   slot_nodes_U: torch.Tensor) -> torch.Tensor:
    """Seed from another placement: put each of our units where that placement has the most of its experts.

    Walks the slots in order and takes the unused unit sharing the most experts with the slot (ties: lowest
    unit). Returns node_of_unit [U]."""
    free = list(range(len(unit_experts)))
    node_of_unit = torch.zeros(len(unit_experts), dtype=torch.long)
    for s, content in enumerate(slots):
        u = max(free, key=lambda u: (len(set(unit_experts[u]) & set(content)), -u))
        free.remove(u)
        node_of_unit[u] = slot_nodes_U[s]
    return node_of_unit


def greedy_layout(problem: LayoutProblem) -> torch.Tensor:
    """Place units one by one, heaviest first, each on the node with room where the partial layout scores best.
    Co-activated experts are drawn together as long as that does not make the worst link worse. Returns [U]."""
    u_count, n = problem.share_UE.shape[0], problem.num_nodes
    unit_load = problem.share_UE @ problem.stats.load_E
    node_of_unit = torch.full((u_count,), n, dtype=torch.long)   # n = not placed yet
    room = list(problem.units_per_node)
    for u in sorted(range(u_count), key=lambda u: (-float(unit_load[u]), u)):
        nodes = [x for x in range(n) if room[x] > 0]
        batch = node_of_unit.repeat(len(nodes), 1)
        batch[:, u] = torch.tensor(nodes)
        best = nodes[best_index(problem.cost(batch))]
        node_of_unit[u] = best
        room[best] -= 1
    return node_of_unit


def _swap_pairs(unit_experts: list[tuple[int, ...]]) -> torch.Tensor:
    """[P, 2] unit pairs worth swapping: different contents (two replicas of one expert are interchangeable)."""
    pairs = [(i, j) for i in range(len(unit_experts)) for j in range(i + 1, len(unit_experts))
             if unit_experts[i] != unit_experts[j]]
    return torch.tensor(pairs, dtype=torch.long).view(-1, 2)


def descend(problem: LayoutProblem, node_of_unit_U: torch.Tensor, pairs_P2: torch.Tensor) -> torch.Tensor:
    """Steepest descent: score every swap of two units on different nodes, take the best while it improves."""
    current = node_of_unit_U.clone()
    cost = problem.cost(current[None])[0]
    while True:
        cross = pairs_P2[current[pairs_P2[:, 0]] != current[pairs_P2[:, 1]]]
        if cross.numel() == 0:
            return current
        costs = problem.swap_costs(current, cross)
        best = best_index(costs)
        if not improves(costs[best], cost):
            return current
        i, j = cross[best].tolist()
        current[i], current[j] = current[j].clone(), current[i].clone()
        cost = problem.cost(current[None])[0]


def _kick(node_of_unit_U: torch.Tensor, pairs_P2: torch.Tensor, swaps: int, gen: torch.Generator) -> torch.Tensor:
    """Apply ``swaps`` random cross-node swaps (to leave a local optimum)."""
    out = node_of_unit_U.clone()
    for _ in range(swaps):
        cross = pairs_P2[out[pairs_P2[:, 0]] != out[pairs_P2[:, 1]]]
        if cross.numel() == 0:
            break
        i, j = cross[int(torch.randint(cross.shape[0], (1,), generator=gen))].tolist()
        out[i], out[j] = out[j].clone(), out[i].clone()
    return out


def iterated_local_search(problem: LayoutProblem, unit_experts: list[tuple[int, ...]],
                          seeds: list[torch.Tensor], *, kicks: int, seed: int) -> torch.Tensor:
    """Descend from every seed, keep the best, then ``kicks`` rounds of (two random swaps, descend, keep if
    better) with a generator seeded by ``seed``: the same input always gives the same layout. Returns [U]."""
    pairs = _swap_pairs(unit_experts)
    results = [descend(problem, s, pairs) for s in seeds]
    costs = problem.cost(torch.stack(results))
    best = results[best_index(costs)]
    best_cost = problem.cost(best[None])[0]
    gen = torch.Generator().manual_seed(seed)
    for _ in range(kicks):
        candidate = descend(problem, _kick(best, pairs, 2, gen), pairs)
        cand_cost = problem.cost(candidate[None])[0]
        if improves(cand_cost, best_cost):
            best, best_cost = candidate, cand_cost
    return best


def random_local_search(problem: LayoutProblem, unit_experts: list[tuple[int, ...]], *, restarts: int = 64,
                        kicks: int = 10, seed: int = 1234) -> torch.Tensor:
    """Reference for the benchmark and tests (not used by the planner): a long randomized local search of
    pairwise swaps, ``restarts`` random layouts each improved by ``iterated_local_search``. Returns [U]."""
    gen = torch.Generator().manual_seed(seed)
    slot_nodes = problem.slot_nodes()
    starts = [slot_nodes[torch.randperm(slot_nodes.numel(), generator=gen)] for _ in range(restarts)]
    results = [iterated_local_search(problem, unit_experts, [s], kicks=kicks,
                                     seed=int(torch.randint(1 << 30, (1,), generator=gen)))
               for s in starts]
    return results[best_index(problem.cost(torch.stack(results)))]
