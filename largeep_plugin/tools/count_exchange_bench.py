"""Host time of the count exchange at large EP, one process standing in for the group (``largeep bench
count-exchange``).

Shape legend:
    R  ranks in the EP group      E  experts      L  expert slots per rank (colocated experts)

What a GPU waits for is the host: every forward of a flat dispatch plans its splits on the host from the one
read-back of the count exchange. Here one process plays every rank of an R-rank group: the all-to-all of the counts
is a copy (the process receives what it sent), everything else is the layer's own code, ``AllToAllDispatcher
.exchange`` with what the layer sends along: its input flag, and its per-expert load when the group is small enough
for R copies of it (``comm.load_rides_in_count_exchange``; larger groups sum it in an all_reduce of its own, on the
device). The reference is the same step as the earlier layer did it: the load always in the exchange, the
[R, P + E + 2] result read back whole and summed column by column in Python, O(R * E) host work.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from largeep_plugin.layer.comm import load_rides_in_count_exchange
from largeep_plugin.layer.dispatcher import AllToAllDispatcher


@dataclass(frozen=True)
class CountExchangeTiming:
    ranks: int
    experts: int
    slots: int
    load_in_exchange: bool  # whether the load rides in the exchange at this size
    now_ms: float           # median host time of one exchange, as the layer runs it
    before_ms: float        # the O(R * E) read-back of the earlier layer, for reference

    @property
    def ratio(self) -> float:
        return self.before_ms / self.now_ms if self.now_ms > 0 else float("inf")


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def time_count_exchange(ranks: int, experts: int, slots: int = 1, repeats: int = 20, seed: int = 0) -> CountExchangeTiming:
    """Median host milliseconds of one count exchange for R = ``ranks``, E = ``experts``, L = ``slots``."""
    for name, value in (("ranks", ranks), ("experts", experts), ("slots", slots), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    gen = torch.Generator().manual_seed(seed)
    dispatcher = AllToAllDispatcher(None)
    dispatcher.num_ranks = ranks  # one process stands in for the R ranks of the group
    send_V = torch.randint(0, 64, (ranks * slots,), generator=gen)
    order_A = torch.arange(int(send_V.sum()))
    shared_X = torch.zeros(experts + 2, dtype=torch.int64)
    shared_X[:experts] = torch.randint(0, 64, (experts,), generator=gen)
    fold = load_rides_in_count_exchange(ranks, experts + 1)
    sent_X = shared_X if fold else shared_X[-1:]  # the input flag always rides along

    def on_shared(flags_R: list[int], sums_X: torch.Tensor, _host_sums: list[int] | None) -> None:
        if any(flags_R):
            raise ValueError("bad input")

    def now() -> object:
        return dispatcher.exchange(order_A, send_V, num_tokens=order_A.numel(), top_k=1, topk_weights_TK=None,
                                   num_slots=slots if slots > 1 else None, shared_X=sent_X, on_shared=on_shared)

    def before() -> object:
        # The earlier exchange: every rank's [counts | E load | drops | flag] row read back, sums in Python.
        payload = torch.cat([send_V.view(ranks, slots), shared_X.expand(ranks, -1)], dim=1)
        sent, recv = torch.stack([payload, payload.clone()]).tolist()
        problems = {r: row[-1] for r, row in enumerate(recv) if row[-1]}
        totals = [sum(column) for column in zip(*recv)]
        return problems, totals, [sum(row[:slots]) for row in sent], [sum(row[:slots]) for row in recv]

    return CountExchangeTiming(ranks, experts, slots, fold, _median_ms(now, repeats), _median_ms(before, repeats))


def format_table(rows: list[CountExchangeTiming]) -> str:
    lines = ["    R      E   L   load rides along   host ms/forward   before (O(R*E))   before / now"]
    for r in rows:
        lines.append(f"{r.ranks:5d}  {r.experts:5d}  {r.slots:2d}   {'yes' if r.load_in_exchange else 'no (all_reduce)':>16s}"
                     f"   {r.now_ms:15.3f}   {r.before_ms:15.3f}   {r.ratio:11.1f}x")
    return "\n".join(lines)
