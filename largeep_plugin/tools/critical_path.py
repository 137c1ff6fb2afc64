"""Timing work as each rank's own device would take it, on ranks that share a few cores.

On a machine with fewer cores than ranks, a rank waiting for the busiest one hands its core to it, so a step's
wall clock hides the imbalance a cluster (one GPU per rank) would pay for. Two tools here:

* ``exclusive_seconds(fn)``: run one piece of local work on the ranks one at a time, in rank order, a barrier
  between turns; each rank's time is its own (the others wait in the barrier, a blocking wait, not a spin).
* ``core_sharing(fn)``: how much the ranks slow each other when they run at once on this machine: the same local
  work timed alone (one rank at a time) and with every rank at once, round after round. With as many cores as ranks
  a cluster's figure is 1.0; a VM's cores share the host's clock, caches and memory, and the ratio says how much of
  a gap between the critical path and the wall clock is the machine's.
* ``TurnTaking``: the same for a whole training step, whatever runs it (the plugin's layer, DeepSpeed's AutoEP,
  a plain data-parallel model). While it is on, every collective (every collective method of torch's
  ``ProcessGroup``, however it is called) ends this rank's compute *segment* (the local work since the previous
  collective) and the next segment starts only when the previous rank has finished its own: rank 0 computes,
  passes a token to rank 1 over a group of its own, and so on round the ranks; the last rank's arrival starts a
  world collective. So no two ranks ever compute at once, and the segment times
  are what each device would take. The ranks enter each collective *together*: a barrier of the token's group
  releases them when the last has finished its segment, so no rank starts its transfer while another computes (a
  rank that entered early would otherwise have pushed its data into the others' socket buffers during their
  turns, a head start a balanced step does not give). A step's
  **critical path** is then the sum over segments of the slowest rank's time, plus the communication: each
  collective's time from the last rank's release until every rank has left it (the ranks share the machine's
  monotonic clock), what the network took (here: gloo over loopback, unless the world runs on the emulated
  cluster, ``largeep cluster``). ``balanced``: the same sum with every rank at the mean of the ranks (the work of
  the step spread perfectly: the force-balanced figure). Collectives are waited for at once in this mode,
  asynchronous ones included (their overlap with compute is not measured). Bytes: every world-wide all-to-all
  records what it sends to each rank, so a layout of the ranks on nodes gives the inter-node bytes of the step.
* ``TurnTaking(turns=False)``: the ranks run at once, every collective (asynchronous ones included) waited for
  where it is called, the step taken apart the same way: with as many cores as ranks (nothing shared but the
  machine's caches and memory), its wall clock is what the critical path must agree with, and its segments and
  collectives say where the two differ.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

# The collective methods of torch.distributed's ProcessGroup: every collective, whoever calls it (torch's own
# functions, DeepSpeed's comm backend, which keeps references to them, the plugin's comm.py), ends up in one.
# Point-to-point (send, recv) is not among them: the turn-taking's token travels that way.
COLLECTIVES = ("allreduce", "allreduce_coalesced", "allgather", "allgather_coalesced", "allgather_into_tensor_coalesced",
               "_allgather_base", "all_gather_single", "all_gather_single_coalesced", "alltoall", "alltoall_base",
               "all_to_all_single", "broadcast", "barrier", "monitored_barrier", "reduce", "reduce_scatter",
               "_reduce_scatter_base", "reduce_scatter_single", "reduce_scatter_single_coalesced",
               "reduce_scatter_tensor_coalesced", "gather", "scatter")
_BYTE_COUNTED = ("alltoall_base", "all_to_all_single")


def exclusive_seconds(fn: Callable[[], Any], group: Any = None, *, repeats: int = 1) -> list[float]:
    """Run ``fn()`` ``repeats`` times on every rank of ``group``, one rank at a time; returns every rank's best time
    (seconds, in group rank order; the same list on every rank). ``fn`` must not communicate."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats!r} must be >= 1")
    size = dist.get_world_size(group) if dist.is_initialized() else 1
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    mine = float("inf")
    for turn in range(size):
        if turn == rank:
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                mine = min(mine, time.perf_counter() - start)
        if size > 1:
            dist.barrier(group=group)
    if size == 1:
        return [mine]
    every = torch.zeros(size, dtype=torch.float64)
    every[rank] = mine
    dist.all_reduce(every, group=group)
    return every.tolist()


def core_sharing(fn: Callable[[], Any], group: Any = None, *, rounds: int = 5) -> dict[str, Any]:
    """``rounds`` rounds of ``fn()`` on every rank of ``group``: once on each rank alone (``exclusive_seconds``), then
    once on every rank at once (released by a barrier). ``fn`` must not communicate. Returns (the same on every
    rank) ``alone_ms`` and ``together_ms``, each rank's median over the rounds, and ``slowdown``: the median over
    rounds of the worst rank's together / alone time of that round (a round's two times are moments apart, so a
    machine whose speed wanders between rounds does not count as sharing)."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds!r} must be >= 1")
    size = dist.get_world_size(group) if dist.is_initialized() else 1
    alone, together = [], []
    for _ in range(rounds):
        alone.append(exclusive_seconds(fn, group))
        if size > 1:
            dist.barrier(group=group)
        start = time.perf_counter()
        fn()
        every = torch.zeros(size, dtype=torch.float64)
        every[dist.get_rank(group) if size > 1 else 0] = time.perf_counter() - start
        if size > 1:
            dist.all_reduce(every, group=group)
        together.append(every.tolist())
    per_rank = lambda runs: [1e3 * statistics.median(r[i] for r in runs) for i in range(size)]  # noqa: E731
    return {"alone_ms": per_rank(alone), "together_ms": per_rank(together), "rounds": rounds,
            "slowdown": statistics.median(max(t / a for t, a in zip(tr, ar)) for tr, ar in zip(together, alone))}


@dataclass(frozen=True)
class StepTimes:
    """One step under ``TurnTaking``, every rank's view gathered.

    Attributes:
        segments_RS: [R][S] seconds of each rank's S compute segments (the same S on every rank).
        comm_S1: [S - 1] seconds of each collective, from the last rank's arrival until every rank has left it.
        names: [S - 1] the collectives, in order.
        skew_S1: [S - 1] seconds between the first and the last rank's arrival at each collective (under the turns:
            the barrier's release, a few hundred microseconds; without them: the ranks' compute differences).
        sent_bytes_RR: [R][R] bytes rank a sent rank b by ``all_to_all_single`` in the step.
    """

    segments_RS: tuple[tuple[float, ...], ...]
    comm_S1: tuple[float, ...]
    names: tuple[str, ...]
    sent_bytes_RR: tuple[tuple[int, ...], ...]
    skew_S1: tuple[float, ...] = ()

    @property
    def compute(self) -> float:
        """Sum over segments of the slowest rank's time."""
        return sum(max(col) for col in zip(*self.segments_RS))

    @property
    def balanced_compute(self) -> float:
        """Sum over segments of the mean rank's time (the step's work spread perfectly)."""
        return sum(sum(col) / len(col) for col in zip(*self.segments_RS))

    @property
    def communication(self) -> float:
        return sum(self.comm_S1)

    @property
    def critical_path(self) -> float:
        return self.compute + self.communication

    @property
    def busiest_rank_compute(self) -> float:
        """The busiest rank's own compute over the step (a lower bound of ``compute``)."""
        return max(sum(row) for row in self.segments_RS)

    def internode_bytes(self, ranks_per_node: int) -> int:
        """Bytes of the step's all-to-alls that crossed nodes, ranks numbered node by node."""
        return sum(n for a, row in enumerate(self.sent_bytes_RR) for b, n in enumerate(row)
                   if a // ranks_per_node != b // ranks_per_node)


class _CollectivePatch:
    """Replaces every collective method of torch's ``ProcessGroup`` with ``self._wrap(name, real)`` between
    ``_patch`` and ``_unpatch`` (the descriptors put back as they were)."""

    _real: dict[str, Any]

    def _wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        raise NotImplementedError

    def _patch(self) -> None:
        group_type = torch._C._distributed_c10d.ProcessGroup
        self._real = {}
        for name in COLLECTIVES:
            raw = group_type.__dict__.get(name)
            if raw is not None:
                self._real[name] = raw
                setattr(group_type, name, self._wrap(name, getattr(group_type, name)))

    def _unpatch(self) -> None:
        group_type = torch._C._distributed_c10d.ProcessGroup
        for name, real in self._real.items():
            setattr(group_type, name, real)
        self._real = {}


class TurnTaking(_CollectivePatch):
    """``with clock: step()`` then ``clock.gathered()`` (collective) for the ``StepTimes`` of the step. Build it on
    every rank of the world at the same point (it creates a group for its token); use it for one step at a time.
    ``turns=False``: no turns and no release barrier, the ranks run at once; collectives are still waited for where
    they are called and the step is taken apart alike (the wall-clock side of the check at as many ranks as cores).

    The token goes round: rank r starts a segment when rank r - 1 has finished its own, rank 0 when the last rank
    has (after the first), so no two ranks compute at once even around a collective of a subgroup. The step must
    run the same collectives on every rank: they are compared at the end (ValueError); with different numbers of
    them the token cannot go round, and the step ends in the token group's timeout."""

    def __init__(self, synchronize: Callable[[], None] | None = None, *, turns: bool = True) -> None:
        """``synchronize``: on an accelerator, the call that waits for its queued work (``torch.accelerator.synchronize``),
        run at the end of every segment and after every collective, so that the times are the device's."""
        self.synchronize = synchronize
        self.turns = turns
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self._token_group = dist.new_group(backend="gloo")
        self._token = torch.zeros(1)
        self._sends: list[Any] = []
        self._segments: list[float] = []
        self._arrive: list[float] = []  # perf_counter at each collective's call and return (one clock per machine)
        self._leave: list[float] = []
        self._names: list[str] = []
        self._sent = [0] * self.size
        self._real = {}
        self._busy = False
        self._start = 0.0

    # ---- the segment chain ---------------------------------------------------------------------------------------
    def _begin(self, first: bool = False) -> None:
        if self.turns and (self.rank > 0 or (not first and self.size > 1)):
            source = (self.rank - 1) % self.size
            dist.recv(self._token, source, group=self._token_group)
        self._start = time.perf_counter()

    def _end(self, last: bool = False) -> None:
        if self.synchronize is not None:
            self.synchronize()
        self._segments.append(time.perf_counter() - self._start)
        if self.turns and self.size > 1 and not (last and self.rank == self.size - 1):
            # Sent without waiting: the receiver may be inside a collective still (rank 0, for the last rank's token).
            self._sends.append(dist.isend(self._token, (self.rank + 1) % self.size, group=self._token_group))

    def _wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def collective(pg: Any, *args: Any, **kwargs: Any) -> Any:
            if self._busy or pg is self._token_group:
                return real(pg, *args, **kwargs)
            self._busy = True
            try:
                self._end()
                if name in _BYTE_COUNTED and pg.size() == self.size:
                    self._count_bytes(*args)
                if self.turns and self.size > 1:
                    # Released together: the last rank's token has gone out, every rank is done with its segment.
                    dist.barrier(group=self._token_group)
                self._arrive.append(time.perf_counter())
                work = real(pg, *args, **kwargs)
                if work is not None:
                    work.wait()
                if self.synchronize is not None:
                    self.synchronize()
                self._leave.append(time.perf_counter())
                self._names.append(name)
                self._begin()
                return work
            finally:
                self._busy = False
        return collective

    def _count_bytes(self, output: torch.Tensor, input: torch.Tensor, output_split_sizes: Any = None,
                     input_split_sizes: Any = None, *_: Any) -> None:
        rows = input.shape[0] if input.dim() else 0
        per_row = input.element_size() * (input.numel() // max(rows, 1))
        splits = list(input_split_sizes) if input_split_sizes else [rows // self.size] * self.size
        for dest, n in enumerate(splits):
            self._sent[dest] += int(n) * per_row

    def __enter__(self) -> "TurnTaking":
        self._patch()
        self._busy = False
        self._begin(first=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._end(last=True)
        self._unpatch()
        for work in self._sends:
            work.wait()
        self._sends.clear()

    # ---- results ---------------------------------------------------------------------------------------------------
    def gathered(self) -> StepTimes:
        """Every rank's segments, bytes and collective times, gathered (a collective; call on every rank after the
        ``with``). A collective's time runs from the last rank's arrival to the last rank's return: the ranks of
        one machine (or of the emulated cluster's namespaces, one kernel) read the same monotonic clock."""
        mine = (tuple(self._segments), tuple(self._arrive), tuple(self._leave), tuple(self._names), tuple(self._sent))
        every: list[Any] = [None] * self.size
        dist.all_gather_object(every, mine)
        if len({len(e[0]) for e in every}) != 1 or len({e[3] for e in every}) != 1:
            raise ValueError("the ranks ran different collectives in the step: segments per rank "
                             f"{[len(e[0]) for e in every]}; the critical path is not defined")
        self._segments, self._arrive, self._leave, self._names = [], [], [], []
        self._sent = [0] * self.size
        count = range(len(every[0][3]))
        comm = tuple(max(0.0, max(e[2][i] for e in every) - max(e[1][i] for e in every)) for i in count)
        skew = tuple(max(e[1][i] for e in every) - min(e[1][i] for e in every) for i in count)
        return StepTimes(segments_RS=tuple(e[0] for e in every), comm_S1=comm, names=every[0][3],
                         sent_bytes_RR=tuple(e[4] for e in every), skew_S1=skew)


def typical_step(steps: Sequence[StepTimes]) -> StepTimes | None:
    """The step of medians: every (rank, segment) time and every collective's time is its median over ``steps``.
    A rank's hiccup in one step (the machine's other work, a page fault) then does not count as that rank being
    the slowest, which a per-step maximum over many ranks would (the more ranks, the more it would). None when
    the steps ran different collectives (their segments do not line up)."""
    if not steps or len({s.names for s in steps}) != 1:
        return None
    first = steps[0]
    segments = tuple(tuple(statistics.median([s.segments_RS[r][k] for s in steps]) for k in range(len(row)))
                     for r, row in enumerate(first.segments_RS))
    comm = tuple(statistics.median([s.comm_S1[i] for s in steps]) for i in range(len(first.comm_S1)))
    skew = tuple(statistics.median([s.skew_S1[i] for s in steps]) for i in range(len(first.skew_S1)))
    return StepTimes(segments_RS=segments, comm_S1=comm, names=first.names, sent_bytes_RR=first.sent_bytes_RR,
                     skew_S1=skew)


def median_step(steps: Sequence[StepTimes]) -> dict[str, float]:
    """The figures a table shows (seconds) of ``typical_step(steps)``; of the per-step figures' medians where the
    steps ran different collectives. Also ``per_step_critical_path_s``, the median of the steps' own."""
    per_step = statistics.median([s.critical_path for s in steps]) if steps else 0.0
    typical = typical_step(steps)
    if typical is not None:
        steps = [typical]
    return {"critical_path_s": statistics.median([s.critical_path for s in steps]),
            # Each step's own critical path (its slowest rank per segment, hiccups included), their median: what
            # a wall clock that pays every step's slowest rank compares with.
            "per_step_critical_path_s": per_step,
            "compute_s": statistics.median([s.compute for s in steps]),
            "balanced_compute_s": statistics.median([s.balanced_compute for s in steps]),
            "communication_s": statistics.median([s.communication for s in steps]),
            "busiest_rank_compute_s": statistics.median([s.busiest_rank_compute for s in steps])}
