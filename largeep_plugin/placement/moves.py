"""Moves of home experts: a better layout of the experts a model already trains, and whether it is worth the bytes.

Shape suffixes: E experts, R ranks of one EP group, N nodes, U units (what one rank holds: its home experts).

A layout is fixed when a layer is built. While it trains, which experts are picked together (the co-activation)
drifts, and with it which experts should share a node: a pair that is often chosen by one token costs one
inter-node crossing when both live on the same remote node, two when they live on two. ``plan_moves`` looks,
at a step boundary, for a layout of the *same* units (every rank keeps as many home experts as it has: a move
relabels what the slots hold, so parameter tensors, optimizer slots and process groups all stay where they are)
whose busiest inter-node link, replayed on the recent co-activation, is lighter than today's, and says whether
the gain pays for the move:

1. score today's layout on the recent statistics (``figures``' traffic model: node-batched dispatch, a token
   crossing to a node once whatever number of its experts live there; ``search.LayoutProblem``);
2. search layouts of the units over the nodes (``search.iterated_local_search`` seeded with today's layout and the
   greedy one: pairwise swaps between nodes), then undo every swap that does not pay (fewest moves for the gain);
3. place the units on ranks: a unit that stays on its node keeps its rank, the ones that arrive take the ranks
   the leavers freed (in rank order);
4. worth it when the busiest link gets lighter by more than ``margin`` (a fraction of today's) *and* the time the
   link saves over the next ``horizon_steps`` steps (the window's saving per step; each crossing row travels
   ``CROSSINGS_PER_STEP`` times a step) is more than the move costs: each moved expert's bytes (weights,
   optimizer state, gradient) over the link it crosses, the busiest such link's total, with its latency.

Pure and deterministic: every rank computes the same plan from the same numbers (float64 on the host, a fixed
seed), with no communication.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from . import search
from .figures import link_tokens, route_flows, routing_stats
from .plan import layout_problem
from .topology import Topology

# A token row that crosses a link in the dispatch crosses it again in the combine, and both again in backward.
CROSSINGS_PER_STEP = 4
# Random restarts of the local search (fixed seed: the same input gives the same plan).
KICKS = 8
SEED = 0


@dataclass(frozen=True, kw_only=True)
class MovePlan:
    """The outcome of ``plan_moves``.

    Fields:
        home: [R] the experts each rank holds after the moves (ascending; the same count per rank as before).
        moves: (expert, from rank, to rank) of every expert that changes rank, by expert id; empty when nothing
            moves (no better layout, or not worth it: then ``home`` is today's).
        worth: whether the moves pay (step 4 of the module docstring); ``moves`` is empty when False.
        link_seconds_before, link_seconds_after: the busiest inter-node link's token time over the statistics'
            window (all its dispatches and combines, forward and backward), today's layout and the candidate's;
            the window's latencies are not counted (the number of messages does not change with the layout).
        link_tokens_before, link_tokens_after: [N][N] token rows from node a to node b per dispatch on the window
            (the model's estimate), for the monitor.
        move_bytes: bytes the candidate's moves send in all (inter-node and intra-node).
        move_seconds: the busiest link's share of them over its bandwidth (intra-node links included).
        candidate_moves: the moves the candidate would make (also when it is not worth it), for the monitor.
    """

    home: tuple[tuple[int, ...], ...]
    moves: tuple[tuple[int, int, int], ...]
    worth: bool
    link_seconds_before: float
    link_seconds_after: float
    link_tokens_before: tuple[tuple[float, ...], ...]
    link_tokens_after: tuple[tuple[float, ...], ...]
    move_bytes: float
    move_seconds: float
    candidate_moves: tuple[tuple[int, int, int], ...]

    @property
    def gain(self) -> float:
        """Fraction of the busiest link's time the candidate saves (0 when today's is idle)."""
        if self.link_seconds_before <= 0:
            return 0.0
        return 1.0 - self.link_seconds_after / self.link_seconds_before

    def to_dict(self) -> dict[str, Any]:
        return {"home": [list(h) for h in self.home], "moves": [list(m) for m in self.moves], "worth": self.worth,
                "gain": self.gain, "link_seconds_before": self.link_seconds_before,
                "link_seconds_after": self.link_seconds_after, "move_bytes": self.move_bytes,
                "move_seconds": self.move_seconds, "candidate_moves": [list(m) for m in self.candidate_moves]}


def check_movable(home: Sequence[Sequence[int]], num_experts: int) -> tuple[tuple[int, ...], ...]:
    """``home`` as tuples, checked: every expert on exactly one rank (a move relabels slots; an expert with several
    homes has a replica group, a process group fixed when the layer was built, which a relabel would break)."""
    held = tuple(tuple(int(x) for x in h) for h in home)
    seen = sorted(x for h in held for x in h)
    if seen != list(range(num_experts)):
        twice = sorted({x for x in seen if seen.count(x) > 1})
        raise NotImplementedError(
            f"moves need every expert on exactly one rank of the EP group; the layout {[list(h) for h in held]} "
            + (f"holds experts {twice} on several ranks (static replicas: their replica groups are process groups "
               "fixed at construction)" if twice else f"does not hold every expert 0..{num_experts - 1}"))
    return held


def plan_moves(home: Sequence[Sequence[int]], topology: Topology, load_E: Any, coactivation_EE: Any, *,
               top_k: int | None, row_bytes: float, expert_bytes: float, margin: float,
               window_steps: int = 1, horizon_steps: int = 1) -> MovePlan:
    """A better layout of the home experts on the recent statistics, and whether it is worth moving to.

    Args:
        home: [R] the experts each rank of the EP group holds today (each expert on one rank: ``check_movable``).
        topology: the EP group's ranks as nodes (R ranks).
        load_E: [E] assignments per expert over the recent window (all ranks of the EP group).
        coactivation_EE: [E, E] tokens that chose both experts over the same window (diagonal: the load), or None.
        top_k: experts per token (sharper traffic estimate for top_k > 2), or None.
        row_bytes: bytes of one token row on the wire (hidden size x element size).
        expert_bytes: bytes one moved expert sends (weights, optimizer state, gradient).
        margin: the busiest link must get lighter by more than this fraction of today's.
        window_steps: the steps the statistics were counted over.
        horizon_steps: steps the gain is counted over (until the next decision) against the move's cost.
    Returns:
        the ``MovePlan`` (its ``moves`` empty when nothing is worth moving).
    """
    num_experts = len(torch.as_tensor(load_E).reshape(-1))
    held = check_movable(home, num_experts)
    if len(held) != topology.world_size:
        raise ValueError(f"home has {len(held)} ranks but the topology {topology.world_size}")
    stats = routing_stats(num_experts, topology, load_E, coactivation_EE, top_k)
    units = [h for h in held]
    node_of_rank = torch.tensor(topology.node_of_rank(), dtype=torch.long)
    units_per_node = tuple(len(topology.ranks_of(n)) for n in range(topology.num_nodes))
    # step 1: today's layout (unit u = rank u's experts, on rank u's node)
    problem = _problem(units, units_per_node, topology, stats)
    today = node_of_rank.clone()
    cost_today = problem.cost(today[None])[0]
    # step 2: search, then keep only the swaps that pay
    best = today
    if topology.num_nodes > 1:
        seeds = [today, search.greedy_layout(problem)]
        best = search.iterated_local_search(problem, units, seeds, kicks=KICKS, seed=SEED)
        if not search.improves(problem.cost(best[None])[0], cost_today):
            best = today
        best = _fewest_moves(problem, today, best)
    cost_best = problem.cost(best[None])[0]
    # step 3: units on ranks
    new_home = _ranks_for(held, today, best, topology)
    candidate = tuple((x, r, s) for r, h in enumerate(held) for x in h
                      for s, g in enumerate(new_home) if x in g and s != r)
    candidate = tuple(sorted(candidate))
    # step 4: worth it?
    scale = row_bytes * CROSSINGS_PER_STEP / 1e9     # problem costs are tokens / (GB/s)
    before, after = float(cost_today[0]) * scale, float(cost_best[0]) * scale
    move_bytes, move_seconds = _move_cost(candidate, topology, expert_bytes)
    gain = before - after
    worth = bool(candidate) and gain > margin * before and gain * horizon_steps / window_steps > move_seconds
    return MovePlan(home=new_home if worth else held, moves=candidate if worth else (), worth=worth,
                    link_seconds_before=before, link_seconds_after=after,
                    link_tokens_before=_link_tokens(problem, today), link_tokens_after=_link_tokens(problem, best),
                    move_bytes=move_bytes, move_seconds=move_seconds, candidate_moves=candidate)


def layout_figures(home: Sequence[Sequence[int]], topology: Topology, load_E: Any, coactivation_EE: Any, *,
                   top_k: int | None, row_bytes: float) -> tuple[float, tuple[tuple[float, ...], ...]]:
    """(the busiest link's token seconds over the window, token rows per link per dispatch) of ``home`` on the
    statistics: the figure ``plan_moves`` compares, for a layout given by hand (the monitor's replay of the window
    after a move)."""
    num_experts = len(torch.as_tensor(load_E).reshape(-1))
    held = check_movable(home, num_experts)
    stats = routing_stats(num_experts, topology, load_E, coactivation_EE, top_k)
    units_per_node = tuple(len(topology.ranks_of(n)) for n in range(topology.num_nodes))
    problem = _problem(list(held), units_per_node, topology, stats)
    nodes = torch.tensor(topology.node_of_rank(), dtype=torch.long)
    seconds = float(problem.cost(nodes[None])[0][0]) * row_bytes * CROSSINGS_PER_STEP / 1e9
    return seconds, _link_tokens(problem, nodes)


def _problem(units: list[tuple[int, ...]], units_per_node: tuple[int, ...], topology: Topology,
             stats: Any) -> search.LayoutProblem:
    return layout_problem(units, units_per_node, topology, stats)   # built as the static planner builds it


def _fewest_moves(problem: search.LayoutProblem, today_U: torch.Tensor, best_U: torch.Tensor) -> torch.Tensor:
    """Undo swaps of ``best_U`` that do not pay: repeatedly swap a unit away from its node back with a unit that
    sits on that unit's node of today (and is itself away), when the cost does not get worse; units back home
    move no bytes."""
    current = best_U.clone()
    cost = problem.cost(current[None])[0]
    changed = True
    while changed:
        changed = False
        away = [u for u in range(current.numel()) if int(current[u]) != int(today_U[u])]
        for u in away:
            if int(current[u]) == int(today_U[u]):
                continue
            partners = [v for v in away if v != u and int(current[v]) == int(today_U[u])
                        and int(current[v]) != int(today_U[v])]
            for v in partners:
                trial = current.clone()
                trial[u], trial[v] = current[v], current[u]
                trial_cost = problem.cost(trial[None])[0]
                if not search.improves(cost, trial_cost):   # no worse than keeping the swap
                    current, cost, changed = trial, trial_cost, True
                    break
    return current


def _ranks_for(held: tuple[tuple[int, ...], ...], today_U: torch.Tensor, nodes_U: torch.Tensor,
               topology: Topology) -> tuple[tuple[int, ...], ...]:
    """Step 3: a unit that stays on its node keeps its rank; arriving units take the freed ranks in rank order."""
    out: list[tuple[int, ...] | None] = [None] * len(held)
    arriving: dict[int, list[int]] = {}
    for u in range(len(held)):
        if int(nodes_U[u]) == int(today_U[u]):
            out[u] = held[u]
        else:
            arriving.setdefault(int(nodes_U[u]), []).append(u)
    for node, units in arriving.items():
        free = [r for r in topology.ranks_of(node) if out[r] is None]
        for r, u in zip(free, sorted(units)):
            out[r] = held[u]
    if any(h is None for h in out):   # a unit count per node that does not match: cannot happen for a layout
        raise AssertionError(f"unplaced ranks in {out}")
    return tuple(out)  # type: ignore[arg-type]


def _move_cost(moves: Sequence[tuple[int, int, int]], topology: Topology, expert_bytes: float) -> tuple[float, float]:
    """(bytes in all, the busiest link's move seconds) of ``moves``: each moved expert's bytes over the link from
    its old node to its new one (intra-node links too: moving inside a node is cheap, not free)."""
    n = topology.num_nodes
    per_link = torch.zeros(n, n, dtype=torch.float64)
    for _, src, dst in moves:
        per_link[topology.node_of(src), topology.node_of(dst)] += expert_bytes
    seconds = 0.0
    for a in range(n):
        for b in range(n):
            if per_link[a, b] > 0:
                seconds = max(seconds, topology.link(a, b).seconds(float(per_link[a, b])))
    return float(per_link.sum()), seconds


def _link_tokens(problem: search.LayoutProblem, nodes_U: torch.Tensor) -> tuple[tuple[float, ...], ...]:
    n = problem.num_nodes
    onehot = torch.nn.functional.one_hot(nodes_U, n).to(torch.float64)
    capacity = torch.einsum("un,ue->ne", onehot, problem.share_UE)[None]
    tokens = link_tokens(route_flows(capacity, problem.stats.source_N), problem.stats)[0]
    return tuple(tuple(float(v) for v in row) for row in tokens.tolist())
