"""Clones of hot experts in spare slots: the plan that follows the load while a model trains.

Shape suffixes: E experts, R ranks of one EP group, S spare slots per rank, N nodes, M copies of one expert.

Every rank of an EP group keeps its *home* experts (the parameters the optimizer sees; several when colocated, and
static replicas of one expert on several ranks when the placement has them) and ``S`` spare slots. A *clone* is a
copy of a home expert in a spare slot. Each expert's tokens are split between its copies (homes and clones) by
*shares*, chosen so that the rows each rank computes come as close to the mean as the slots allow. The plan is
pure data: computed on every rank from the same numbers (the global load per expert), it is the same everywhere.

The planner, ``plan_clones(load_E, home, spare_slots, topology)``, in steps:
1. start from the homes: each expert's load split evenly over its home copies (its static replicas);
2. greedily, while a spare slot is left: take the busiest rank and, on it, the expert with the most rows; put a
   clone of it in a free slot of the least loaded rank that does not hold it yet, and re-split that expert's load
   over its copies by water-filling (each copy takes what lifts its rank to a common level). Candidates within
   ``ROW_TOLERANCE`` of the least loaded are equal for rows; among them the clone goes where the busiest
   inter-node link stays lightest (token rows plus the clone's weight refresh and gradient return), then to the
   node of the home that feeds it, then to the lowest rank. Stop when the best move no longer lowers the
   busiest rank;
3. refine: re-split every expert with several copies over them again, a few rounds (the split of one expert
   changes the levels the others see); a clone left with under ``PRUNE_SHARE`` of the mean rows is removed (its
   refresh would cost more than it balances).

``replan(current, load_E, ...)`` adds hysteresis: the plan of step 2-3 replaces the current one only when it is
better by ``margin`` (busiest rank rows first, as a fraction of the mean; then the busiest link); otherwise the
current clones stay and only their shares follow the new load (``ClonePlan.refit``). A change costs no extra bytes:
every clone is refreshed from its home after every optimizer step whether it moved or not, so the margin guards
against routing that flips with the noise of the load; where a clone sits (its refresh and gradient cross a link
every step) is what the link figure weighs.

Routing (``route_tables``): a token from node a that chose expert e goes to copy j with probability
``p[a, e, j]``: copies on a's own node first, up to their share, the rest to the other nodes in proportion to
their spare room (``figures.route_flows``), so every copy still gets its share on average.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .figures import route_flows, source_shares
from .topology import Topology, as_int

# Candidate ranks whose rows are within this fraction of the mean of the least loaded one are equal for rows;
# the busiest link, then the feeding home's node, then the rank id decide between them.
ROW_TOLERANCE = 0.01
# Rounds of re-splitting the experts with several copies after the greedy placement.
REFINE_ROUNDS = 3
# A clone left with fewer rows than this fraction of the mean is removed: it would cost a refresh for nothing.
PRUNE_SHARE = 0.01


@dataclass(frozen=True, kw_only=True)
class CloneFigures:
    """What a plan costs on a load.

    Fields:
        rows_R: rows each rank computes per step (the load's unit: assignments).
        max_rows, mean_rows: the busiest rank's and the mean; ``rank_imbalance`` = max / mean.
        link_bytes_NN: bytes per step from node a to node b: token rows (dispatch and combine, forward and
            backward) plus each cross-node clone's weight refresh (home to clone) and gradient return (back).
        max_link_seconds: the busiest link's bytes over its bandwidth (0 on one node).
        refresh_bytes: bytes of clone weights sent per step in all (every clone, same node or not).
    """

    rows_R: tuple[float, ...]
    max_rows: float
    mean_rows: float
    link_bytes_NN: tuple[tuple[float, ...], ...]
    max_link_seconds: float
    refresh_bytes: float

    @property
    def rank_imbalance(self) -> float:
        return self.max_rows / self.mean_rows if self.mean_rows > 0 else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "rank_imbalance": self.rank_imbalance}


@dataclass(frozen=True, kw_only=True, eq=False)
class ClonePlan:
    """Homes, clones and the split of every expert's tokens over its copies, for one EP group.

    Fields:
        num_experts: E.
        home: [R] the home experts of each rank, ascending (one per rank unless colocated; an expert may have
            several homes: static replicas).
        clones: [R][S] the expert in each spare slot of each rank, -1 for an empty slot.
        feeders: [R][S] the rank whose home copy sends the clone its weights and receives its gradient (-1 for an
            empty slot): a home on the clone's node when there is one, else the expert's first home.
        shares: [E] the share of the expert's tokens each of its copies takes, copies in ``copies(e)`` order;
            they sum to 1.
        topology: the EP group's ranks as nodes (one node when unknown).

    Slots: on every rank, slot l < L (L = the most homes one rank holds) is its l-th home expert, slot L + s its
    spare slot s; ``num_slots`` = L + S on every rank (the width of the dispatch's count exchange).
    """

    num_experts: int
    home: tuple[tuple[int, ...], ...]
    clones: tuple[tuple[int, ...], ...]
    feeders: tuple[tuple[int, ...], ...]
    shares: tuple[tuple[float, ...], ...]
    topology: Topology

    def __post_init__(self) -> None:
        r, e = len(self.home), self.num_experts
        if self.topology.world_size != r:
            raise ValueError(f"ClonePlan: the topology has {self.topology.world_size} ranks, home lists {r}")
        if len(self.clones) != r or len(self.feeders) != r or len({len(c) for c in self.clones}) > 1:
            raise ValueError("ClonePlan: clones and feeders need one row of S slots per rank")
        for rank, (slots, feeds) in enumerate(zip(self.clones, self.feeders)):
            for x, f in zip(slots, feeds):
                if x == -1:
                    continue
                if not 0 <= x < e or x in self.home[rank]:
                    raise ValueError(f"ClonePlan: rank {rank} clones expert {x}, which is out of range or its home")
                if not (0 <= f < r and x in self.home[f]):
                    raise ValueError(f"ClonePlan: the clone of expert {x} on rank {rank} is fed by rank {f}, "
                                     "which is not a home of it")
            kept = [x for x in slots if x != -1]
            if len(set(kept)) != len(kept):
                raise ValueError(f"ClonePlan: rank {rank} holds two clones of one expert: {slots}")
        if len(self.shares) != e or any(len(s) != len(self.copies(x)) for x, s in enumerate(self.shares)):
            raise ValueError("ClonePlan: shares need one entry per copy of every expert")

    # ---- views -------------------------------------------------------------------------------------------------
    @property
    def num_ranks(self) -> int:
        return len(self.home)

    @property
    def spare_slots(self) -> int:
        return len(self.clones[0]) if self.clones else 0

    @property
    def num_home_slots(self) -> int:
        return max(len(h) for h in self.home)

    @property
    def num_slots(self) -> int:
        return self.num_home_slots + self.spare_slots

    @property
    def num_clones(self) -> int:
        return sum(x != -1 for row in self.clones for x in row)

    @functools.cached_property
    def _copies(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        out: list[list[tuple[int, int]]] = [[] for _ in range(self.num_experts)]
        lh = self.num_home_slots
        for r in range(self.num_ranks):
            for l, x in enumerate(self.home[r]):
                out[x].append((r, l))
            for s, x in enumerate(self.clones[r]):
                if x != -1:
                    out[x].append((r, lh + s))
        return tuple(tuple(sorted(c)) for c in out)

    def copies(self, expert: int) -> tuple[tuple[int, int], ...]:
        """(rank, slot) of every copy of ``expert``, ascending: homes and clones."""
        return self._copies[expert]

    def transfers(self) -> tuple[tuple[int, int, int, int], ...]:
        """(feeder rank, its home slot, clone rank, spare slot) of every clone, ascending by clone rank and slot: the
        weight refresh sends the feeder's home copy there, the gradient return sends the clone's gradient back."""
        out = []
        for r in range(self.num_ranks):
            for s, x in enumerate(self.clones[r]):
                if x != -1:
                    f = self.feeders[r][s]
                    out.append((f, self.home[f].index(x), r, s))
        return tuple(out)

    def moved_from(self, other: "ClonePlan | None") -> list[dict[str, int]]:
        """The clones this plan adds against ``other`` (None: against no clones): ``{"expert", "rank", "slot",
        "feeder"}`` each."""
        before = set() if other is None else {(r, s, x) for r, row in enumerate(other.clones) for s, x in enumerate(row)}
        return [{"expert": x, "rank": r, "slot": s, "feeder": self.feeders[r][s]}
                for r, row in enumerate(self.clones) for s, x in enumerate(row) if x != -1 and (r, s, x) not in before]

    def rows_per_rank(self, load_E: Any) -> torch.Tensor:
        """float64 [R]: rows each rank computes when ``load_E`` (tokens per expert) is split by the shares."""
        load = _as_load(load_E, self.num_experts)
        rank_EM, _, share_EM, _ = self._padded
        return torch.zeros(self.num_ranks, dtype=torch.float64).index_add_(
            0, rank_EM.flatten(), (share_EM * load.view(-1, 1)).flatten())

    # ---- routing -----------------------------------------------------------------------------------------------
    @functools.cached_property
    def _padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """[E, M] of every expert's copies, padded: rank, slot (int64), share (float64, 0 for padding), valid."""
        e, m = self.num_experts, max(len(c) for c in self._copies)
        rank = torch.zeros((e, m), dtype=torch.long)
        slot = torch.zeros((e, m), dtype=torch.long)
        share = torch.zeros((e, m), dtype=torch.float64)
        valid = torch.zeros((e, m), dtype=torch.bool)
        for x, copies in enumerate(self._copies):
            k = len(copies)
            rank[x, :k] = torch.tensor([r for r, _ in copies])
            slot[x, :k] = torch.tensor([l for _, l in copies])
            share[x, :k] = torch.tensor(self.shares[x], dtype=torch.float64)
            valid[x, :k] = True
        return rank, slot, share, valid

    @functools.cached_property
    def _tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        topo = self.topology
        n, e = topo.num_nodes, self.num_experts
        rank_EM, slot_EM, share_EM, valid_EM = self._padded
        node_EM = _node_index(topo)[rank_EM]
        # Each node's share of every expert, the flows same node first, and each copy's part of its node's flow.
        cap_NE = torch.zeros(n, e, dtype=torch.float64)
        cap_NE.index_put_((node_EM.flatten(), torch.arange(e).repeat_interleave(rank_EM.shape[1])),
                          share_EM.flatten(), accumulate=True)
        flow_NNE = route_flows(cap_NE[None], source_shares(topo))[0]                 # [a, b, e]
        source_N = source_shares(topo)
        to_copy_NEM = flow_NNE.permute(0, 2, 1).gather(2, node_EM[None].expand(n, -1, -1))   # [a, e, m]: flow a -> node
        cap_EM = cap_NE.t().gather(1, node_EM)
        part_EM = torch.where(cap_EM > 0, share_EM / cap_EM.clamp_min(1e-300), torch.zeros_like(share_EM))
        prob_NEM = to_copy_NEM / source_N.view(n, 1, 1) * part_EM[None]
        cum = torch.where(valid_EM[None], prob_NEM.cumsum(-1), torch.full_like(prob_NEM, 2.0))
        # Rounding must never leave u past the last copy with a share: from it on, the sum is exactly 1.
        last_E = torch.where(share_EM > 0, torch.arange(rank_EM.shape[1]).expand_as(share_EM), -1).max(1).values
        last_E = torch.where(last_E < 0, valid_EM.sum(1) - 1, last_E)
        tail_EM = (torch.arange(rank_EM.shape[1])[None] >= last_E[:, None]) & valid_EM
        cum = torch.where(tail_EM[None], torch.ones_like(cum), cum)
        return cum, rank_EM.expand(n, -1, -1).clone(), slot_EM.expand(n, -1, -1).clone()

    def route_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CPU tensors [N, E, M]: ``cum`` (float64), ``rank``, ``slot`` (int64). A token from node a that chose
        expert e with a number u in [0, 1) goes to copy j = the number of entries of ``cum[a, e]`` <= u, i.e. to
        ``rank[a, e, j]``, slot ``slot[a, e, j]`` (padding: cum = 2, never taken)."""
        return self._tables

    # ---- cost ----------------------------------------------------------------------------------------------------
    def figures(self, load_E: Any, *, row_bytes: float = 1.0, expert_bytes: float = 0.0) -> CloneFigures:
        """Rows per rank and bytes per inter-node link of one training step on ``load_E`` (see ``CloneFigures``);
        ``row_bytes``: one token row on the wire, ``expert_bytes``: one expert's weights (and its gradient)."""
        load = _as_load(load_E, self.num_experts)
        key = (tuple(load.tolist()), float(row_bytes), float(expert_bytes))
        cache = self.__dict__.setdefault("_figures", {})
        if key not in cache:
            cache.clear()  # the planner asks about one load at a time
            cache[key] = self._figures_of(load, row_bytes, expert_bytes)
        return cache[key]

    def _figures_of(self, load: torch.Tensor, row_bytes: float, expert_bytes: float) -> CloneFigures:
        rows = self.rows_per_rank(load)
        topo = self.topology
        n = topo.num_nodes
        links = torch.zeros(n, n, dtype=torch.float64)
        source_N = source_shares(topo)
        rank_EM, _, share_EM, _ = self._padded
        amount_RE = torch.zeros(self.num_ranks, self.num_experts, dtype=torch.float64)
        amount_RE.index_put_((rank_EM.flatten(), torch.arange(self.num_experts).repeat_interleave(rank_EM.shape[1])),
                             (share_EM * load.view(-1, 1)).flatten(), accumulate=True)
        links += _link_rows(amount_RE, topo, source_N) * (2.0 * row_bytes)
        refresh = 0.0
        for f, _, r, _ in self.transfers():
            refresh += expert_bytes
            a, b = topo.node_of(f), topo.node_of(r)
            if a != b:
                links[a, b] += expert_bytes   # weights, home -> clone
                links[b, a] += expert_bytes   # gradient, clone -> home
        return CloneFigures(rows_R=tuple(rows.tolist()), max_rows=float(rows.max()), mean_rows=float(rows.mean()),
                            link_bytes_NN=tuple(tuple(row) for row in links.tolist()),
                            max_link_seconds=_max_link_seconds(links, topo), refresh_bytes=refresh)

    def refit(self, load_E: Any) -> "ClonePlan":
        """The same homes and clones with the shares re-split for ``load_E`` (steps 1 and 3 of the planner)."""
        load = _as_load(load_E, self.num_experts)
        state = _State.start(self.num_experts, self.home, self.spare_slots, load)
        for r, row in enumerate(self.clones):
            for s, x in enumerate(row):
                if x != -1:
                    state.add_clone(x, r, s, self.feeders[r][s])
        state.refine()
        return state.plan(self.topology)

    def to_dict(self) -> dict[str, Any]:
        return {"num_experts": self.num_experts, "home": [list(h) for h in self.home],
                "clones": [list(c) for c in self.clones], "feeders": [list(f) for f in self.feeders],
                "shares": [list(s) for s in self.shares]}


# ---- the planner ---------------------------------------------------------------------------------------------------

def no_clones(num_experts: int, home: Sequence[Sequence[int]], spare_slots: int, topology: Topology,
              load_E: Any = None) -> ClonePlan:
    """The plan without clones: every expert's tokens split over its homes (evenly, or by water-filling on
    ``load_E`` when given)."""
    homes = _check_home(num_experts, home, topology)
    state = _State.start(num_experts, homes, _check_slots(spare_slots), _as_load(load_E, num_experts))
    if load_E is not None:
        state.refine()
    return state.plan(topology)


def plan_from_clones(num_experts: int, home: Sequence[Sequence[int]], clones_RS: Sequence[Sequence[int]],
                     topology: Topology, load_E: Any = None) -> ClonePlan:
    """The plan with these clones (a checkpoint's), each fed by the home the planner would pick, shares fitted to
    ``load_E`` (None: uniform)."""
    homes = _check_home(num_experts, home, topology)
    clones = [list(int(x) for x in row) for row in clones_RS]
    if len(clones) != len(homes) or len({len(row) for row in clones}) > 1:
        raise ValueError(f"clones_RS must give the same number of spare slots for each of the {len(homes)} ranks")
    state = _State.start(num_experts, homes, len(clones[0]) if clones else 0, _as_load(load_E, num_experts))
    for r, row in enumerate(clones):
        for s, x in enumerate(row):
            if x != -1:
                if not 0 <= x < num_experts:
                    raise ValueError(f"clones_RS[{r}][{s}]={x} is not an expert id of 0..{num_experts - 1} or -1")
                state.add_clone(x, r, s, _feeder(homes, x, topology.node_of(r), topology))
    state.refine()
    return state.plan(topology)


def plan_clones(load_E: Any, home: Sequence[Sequence[int]], spare_slots: int, topology: Topology, *,
                row_bytes: float = 1.0, expert_bytes: float = 0.0) -> ClonePlan:
    """Clones for ``load_E`` from scratch (steps 1-3 of the module docstring).

    Args:
        load_E: [E] tokens per expert (a recent average of the global counts).
        home: [R] the home experts of each rank.
        spare_slots: S, spare slots per rank.
        topology: the EP group's ranks as nodes (``Topology.uniform(1, R)`` when all share one).
        row_bytes, expert_bytes: bytes of one token row and of one expert, for the link figure.
    """
    num_experts = len(_as_load(load_E, None))
    homes = _check_home(num_experts, home, topology)
    load = _as_load(load_E, num_experts)
    state = _State.start(num_experts, homes, _check_slots(spare_slots), load)
    source_N = source_shares(topology)
    mean = float(load.sum()) / len(homes)
    while True:
        busiest = int(torch.argmax(state.rows_R))
        if mean <= 0 or float(state.rows_R[busiest]) <= mean * (1 + 1e-12):
            break
        if not _clone_one(state, busiest, topology, source_N, mean, row_bytes, expert_bytes):
            break
    state.refine()
    state.prune(PRUNE_SHARE * mean)
    return state.plan(topology)


def replan(current: ClonePlan | None, load_E: Any, home: Sequence[Sequence[int]], spare_slots: int,
           topology: Topology, *, margin: float = 0.02, row_bytes: float = 1.0,
           expert_bytes: float = 0.0) -> tuple[ClonePlan, bool]:
    """The plan for ``load_E`` with hysteresis: (plan, whether its clones changed).

    ``plan_clones`` from scratch replaces ``current`` (its clones refitted to ``load_E``) only when its busiest
    rank is lower by more than ``margin`` times the mean rows, or, within that margin, its busiest link is lower by
    more than ``margin`` of the current one's. None: no current plan (the first plan is always taken). A current
    plan whose busiest rank is within ``margin`` of the mean is kept without planning afresh (the usual step: the
    host time of a re-plan is then one refit)."""
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin={margin!r} must be a finite number >= 0")
    if current is None:
        fresh = plan_clones(load_E, home, spare_slots, topology, row_bytes=row_bytes, expert_bytes=expert_bytes)
        return fresh, fresh.num_clones > 0
    kept = current.refit(load_E)
    old = kept.figures(load_E, row_bytes=row_bytes, expert_bytes=expert_bytes)
    if old.max_rows <= old.mean_rows * (1 + margin):
        return kept, False  # balanced within the margin already: no fresh plan could beat it by more
    fresh = plan_clones(load_E, home, spare_slots, topology, row_bytes=row_bytes, expert_bytes=expert_bytes)
    if kept.clones == fresh.clones:
        return kept, False
    new = fresh.figures(load_E, row_bytes=row_bytes, expert_bytes=expert_bytes)
    slack = margin * old.mean_rows
    better = new.max_rows < old.max_rows - slack or (
        new.max_rows <= old.max_rows + slack and new.max_link_seconds < old.max_link_seconds * (1 - margin))
    return (fresh, True) if better else (kept, False)


class _State:
    """The planner's working state: amounts A_RE (rows of expert e on rank r), copies, free slots."""

    def __init__(self, num_experts: int, home: tuple[tuple[int, ...], ...], spare_slots: int, load_E: torch.Tensor):
        self.e, self.home, self.s = num_experts, home, spare_slots
        self.r = len(home)
        self.load = load_E
        self.amount_RE = torch.zeros(self.r, num_experts, dtype=torch.float64)
        self.holds_RE = torch.zeros(self.r, num_experts, dtype=torch.bool)
        self.rows_R = torch.zeros(self.r, dtype=torch.float64)  # amount_RE summed over the experts, kept up to date
        self.clones = [[-1] * spare_slots for _ in range(self.r)]
        self.feeders = [[-1] * spare_slots for _ in range(self.r)]
        # Token rows per inter-node link of each expert, [N, N, E], kept up to date for the experts re-split since
        # (``token_links``): the planner asks for them once per clone it places.
        self._links_NNE: torch.Tensor | None = None
        self._links_NN: torch.Tensor | None = None  # their sum over the experts
        self._dirty: set[int] = set(range(num_experts))
        # (feeder node, clone node) of every cross-node clone: its refresh and gradient cross those links.
        self.crossings: list[tuple[int, int]] = []

    @classmethod
    def start(cls, num_experts: int, home: tuple[tuple[int, ...], ...], spare_slots: int,
              load_E: torch.Tensor) -> "_State":
        """Step 1: the homes, each expert's load split evenly over them."""
        state = cls(num_experts, home, spare_slots, load_E)
        for r, held in enumerate(home):
            state.holds_RE[r, list(held)] = True
        per_copy = load_E / state.holds_RE.sum(0).clamp(min=1)
        state.amount_RE = state.holds_RE.double() * per_copy
        state.rows_R = state.amount_RE.sum(1)
        return state

    def free_R(self) -> torch.Tensor:
        return torch.tensor([row.count(-1) for row in self.clones])

    def add_clone(self, expert: int, rank: int, slot: int, feeder: int, node_R: Sequence[int] | None = None) -> None:
        """A clone of ``expert`` in spare ``slot`` of ``rank``, fed by ``feeder``; ``node_R``: the node of every
        rank, to count a cross-node clone's link (None when no link figure is asked for)."""
        self.clones[rank][slot], self.feeders[rank][slot] = expert, feeder
        self.holds_RE[rank, expert] = True
        if node_R is not None and node_R[feeder] != node_R[rank]:
            self.crossings.append((node_R[feeder], node_R[rank]))
        self.waterfill(expert)

    def waterfill(self, expert: int) -> None:
        """Re-split ``expert``'s load over the ranks that hold it: each takes max(0, level - its other rows)."""
        ranks = torch.nonzero(self.holds_RE[:, expert]).flatten()
        other = self.rows_R[ranks] - self.amount_RE[ranks, expert]
        new = _waterfill(other, float(self.load[expert]))
        self.amount_RE[ranks, expert] = new
        self.rows_R[ranks] = other + new
        self._dirty.add(expert)

    def token_links(self, topology: Topology, source_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 ([N, N, E], [N, N]): rows of each expert crossing each link (``_link_rows`` per expert) and their
        sum, recomputed only for the experts re-split since the last call."""
        if self._links_NNE is None:
            self._links_NNE = _link_rows_per_expert(self.amount_RE, topology, source_N)
            self._links_NN = self._links_NNE.sum(-1)
        elif self._dirty:
            cols = sorted(self._dirty)
            new = _link_rows_per_expert(self.amount_RE[:, cols], topology, source_N)
            self._links_NN = self._links_NN + new.sum(-1) - self._links_NNE[:, :, cols].sum(-1)
            self._links_NNE[:, :, cols] = new
        self._dirty.clear()
        return self._links_NNE, self._links_NN  # type: ignore[return-value]

    def refine(self) -> None:
        """Step 3: re-split every expert with several copies, a few rounds."""
        multi = [x for x in range(self.e) if int(self.holds_RE[:, x].sum()) > 1]
        for _ in range(REFINE_ROUNDS):
            for x in multi:
                self.waterfill(x)

    def prune(self, min_rows: float) -> None:
        """Remove the clones that ended with fewer than ``min_rows`` rows, then re-split their experts."""
        dropped = set()
        for r in range(self.r):
            for s, x in enumerate(self.clones[r]):
                if x != -1 and float(self.amount_RE[r, x]) < min_rows:
                    self.clones[r][s] = self.feeders[r][s] = -1
                    self.crossings = []  # only the planner's search reads them, and it is over
                    self.holds_RE[r, x] = False
                    self.rows_R[r] -= self.amount_RE[r, x]
                    self.amount_RE[r, x] = 0.0
                    dropped.add(x)
        if dropped:
            for x in sorted(dropped):
                self.waterfill(x)
            self.refine()

    def plan(self, topology: Topology) -> ClonePlan:
        lh = max(len(h) for h in self.home)
        shares = []
        for x in range(self.e):
            copies = sorted([(r, l) for r in range(self.r) for l, y in enumerate(self.home[r]) if y == x]
                            + [(r, lh + s) for r in range(self.r) for s, y in enumerate(self.clones[r]) if y == x])
            amounts = [float(self.amount_RE[r, x]) for r, _ in copies]
            total = sum(amounts)
            shares.append(tuple(a / total for a in amounts) if total > 0 else tuple(1.0 / len(copies) for _ in copies))
        return ClonePlan(num_experts=self.e, home=self.home, clones=tuple(tuple(c) for c in self.clones),
                         feeders=tuple(tuple(f) for f in self.feeders), shares=tuple(shares), topology=topology)


def _waterfill(other_J: torch.Tensor, load: float) -> torch.Tensor:
    """float64 [J]: amounts a_j = max(0, level - other_j) summing to ``load`` (the lowest ranks filled first);
    all zero for no load."""
    if load <= 0:
        return torch.zeros_like(other_J)
    sorted_J, order = torch.sort(other_J, stable=True)
    # The level lies between sorted[i-1] and sorted[i] once i copies are under it.
    level = float(sorted_J[0]) + load
    for i in range(1, len(sorted_J) + 1):
        level = (float(sorted_J[:i].sum()) + load) / i
        if i == len(sorted_J) or level <= float(sorted_J[i]):
            break
    return (level - other_J).clamp(min=0.0)


def _clone_one(state: _State, busiest: int, topology: Topology, source_N: torch.Tensor, mean: float,
               row_bytes: float, expert_bytes: float) -> bool:
    """Step 2, once: clone an expert of the busiest rank where it lowers that rank most; False when no clone helps."""
    rows = state.rows_R
    free = state.free_R() > 0
    top = float(rows[busiest])
    order = torch.sort(-state.amount_RE[busiest], stable=True).indices.tolist()  # most rows first, ties by id
    for x in order:
        if float(state.amount_RE[busiest, x]) <= 0:
            break
        can = free & ~state.holds_RE[:, x]
        if not bool(can.any()):
            continue
        least = float(rows[can].min())
        tied = torch.nonzero(can & (rows <= least + ROW_TOLERANCE * mean)).flatten().tolist()
        holders = torch.nonzero(state.holds_RE[:, x]).flatten()
        other = torch.cat([rows[holders] - state.amount_RE[holders, x], rows[tied[:1]]])
        level = float(_waterfill(other, float(state.load[x])).add(other).max())
        if level >= top * (1 - 1e-12):
            continue  # spreading this expert further does not lower the busiest rank
        target = _best_target(state, x, tied, topology, source_N, row_bytes, expert_bytes)
        feeder = _feeder(state.home, x, topology.node_of(target), topology)
        state.add_clone(x, target, state.clones[target].index(-1), feeder, topology.node_of_rank())
        return True
    return False


def _best_target(state: _State, expert: int, tied: list[int], topology: Topology, source_N: torch.Tensor,
                 row_bytes: float, expert_bytes: float) -> int:
    """Among ranks equal for rows, the one whose node keeps the busiest link lightest, then the node of the feeding
    home, then the lowest rank."""
    if topology.num_nodes == 1:
        return tied[0]
    base = _links_without(state, expert, topology, source_N, row_bytes, expert_bytes)
    best, best_key = tied[0], None
    seen: set[int] = set()
    for r in tied:
        node = topology.node_of(r)
        if node in seen:
            continue
        seen.add(node)
        feeder = _feeder(state.home, expert, node, topology)
        holders = torch.nonzero(state.holds_RE[:, expert]).flatten().tolist() + [r]
        other = state.rows_R[holders] - state.amount_RE[holders, expert]
        column_R1 = torch.zeros(state.r, 1, dtype=torch.float64)
        column_R1[holders, 0] = _waterfill(other, float(state.load[expert]))
        links = base + _link_rows(column_R1, topology, source_N) * (2.0 * row_bytes)
        if topology.node_of(feeder) != node:
            links[topology.node_of(feeder), node] += expert_bytes
            links[node, topology.node_of(feeder)] += expert_bytes
        key = (round(_max_link_seconds(links, topology), 15), topology.node_of(feeder) != node, r)
        if best_key is None or key < best_key:
            best, best_key = r, key
    return best


def _links_without(state: _State, expert: int, topology: Topology, source_N: torch.Tensor, row_bytes: float,
                   expert_bytes: float) -> torch.Tensor:
    """Link bytes of the state's other experts and of every clone of the state (``expert``'s rows left out)."""
    per_expert, total = state.token_links(topology, source_N)
    links = (total - per_expert[:, :, expert]) * (2.0 * row_bytes)
    for a, b in state.crossings:
        links[a, b] += expert_bytes
        links[b, a] += expert_bytes
    return links


def _link_rows(amount_RE: torch.Tensor, topology: Topology, source_N: torch.Tensor) -> torch.Tensor:
    """float64 [N, N]: rows crossing from node a to node b and back (dispatch a->b plus combine b->a) when rank r
    computes ``amount_RE[r, e]`` rows of expert e, each expert routed same node first (``figures.route_flows``)."""
    return _link_rows_per_expert(amount_RE, topology, source_N).sum(-1)


def _link_rows_per_expert(amount_RE: torch.Tensor, topology: Topology, source_N: torch.Tensor) -> torch.Tensor:
    """float64 [N, N, E]: ``_link_rows`` of each expert on its own."""
    n = topology.num_nodes
    amount_NE = amount_RE.new_zeros((n, amount_RE.shape[1])).index_add_(0, _node_index(topology), amount_RE)
    total_E = amount_NE.sum(0)
    share_NE = torch.where(total_E > 0, amount_NE / total_E.clamp_min(1e-300), torch.zeros_like(amount_NE))
    flow_NNE = route_flows(share_NE[None], source_N)[0] * total_E
    flow_NNE = flow_NNE * (1.0 - torch.eye(n, dtype=torch.float64)).unsqueeze(-1)
    return flow_NNE + flow_NNE.transpose(0, 1)


@functools.lru_cache(maxsize=32)
def _node_index(topology: Topology) -> torch.Tensor:
    """int64 [R]: the node of every rank."""
    return torch.tensor(topology.node_of_rank(), dtype=torch.long)


def _max_link_seconds(links_NN: torch.Tensor, topology: Topology) -> float:
    """The busiest inter-node link's bytes over its bandwidth (0 on one node)."""
    return float((links_NN * _inverse_bandwidth(topology)).max()) if topology.num_nodes > 1 else 0.0


@functools.lru_cache(maxsize=32)
def _inverse_bandwidth(topology: Topology) -> torch.Tensor:
    """float64 [N, N]: seconds per byte of each inter-node link, 0 on the diagonal."""
    n = topology.num_nodes
    return torch.tensor([[0.0 if a == b else 1.0 / (topology.link(a, b).bandwidth_gbytes_per_s * 1e9)
                          for b in range(n)] for a in range(n)], dtype=torch.float64)


def _feeder(home: tuple[tuple[int, ...], ...], expert: int, node: int, topology: Topology) -> int:
    """The home of ``expert`` that feeds a clone on ``node``: the first one on that node, else the first one."""
    homes = [r for r, held in enumerate(home) if expert in held]
    same = [r for r in homes if topology.node_of(r) == node]
    return (same or homes)[0]


def _check_home(num_experts: int, home: Sequence[Sequence[int]], topology: Topology) -> tuple[tuple[int, ...], ...]:
    homes = tuple(tuple(int(x) for x in h) for h in home)
    if topology.world_size != len(homes):
        raise ValueError(f"home lists {len(homes)} ranks, the topology {topology.world_size}")
    placed = {x for h in homes for x in h}
    if placed != set(range(num_experts)) or any(not h for h in homes):
        raise ValueError(f"home={[list(h) for h in homes]} must place every expert of 0..{num_experts - 1} and give "
                         "every rank at least one")
    return homes


def _check_slots(spare_slots: Any) -> int:
    s = as_int(spare_slots)
    if s is None or s < 0:
        raise ValueError(f"dynamic_replicas={spare_slots!r} must be an integer >= 0 (spare slots per rank)")
    return s


def _as_load(load_E: Any, num_experts: int | None) -> torch.Tensor:
    """float64 [E] on the CPU; None: one token per expert."""
    if load_E is None:
        if num_experts is None:
            raise ValueError("load_E is required")
        return torch.ones(num_experts, dtype=torch.float64)
    load = torch.as_tensor(load_E, dtype=torch.float64).cpu().flatten()
    if num_experts is not None and load.numel() != num_experts:
        raise ValueError(f"load_E has {load.numel()} entries, expected one per expert ({num_experts})")
    if not bool(torch.isfinite(load).all()) or bool((load < 0).any()):
        raise ValueError(f"load_E must be finite and >= 0, got {load.tolist()!r:.200}")
    return load
