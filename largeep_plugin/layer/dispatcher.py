"""Dispatch tokens to the ranks that hold their experts, and combine the results.

Shape legend:
    T  tokens on this rank      K  top_k          H  hidden size       R  ranks in the EP group
    A  kept (token, expert) assignments of this rank (A <= T*K; A < T*K only when capacity drops some)
    M  rows this rank receives        L  expert slots per rank (1 unless experts are colocated)

    rows_MH, handle = dispatcher.dispatch(x_TH, dest_rank_TK, keep_TK, topk_weights_TK)
    y_TH = dispatcher.combine(expert(rows_MH), handle)

``dispatch`` is three steps that callers with their own stage boundaries (Megatron's six-stage dispatcher) can
run separately: ``route`` (local: the order of the kept assignments and the rows per destination), ``exchange``
(the count collective, one host sync, the frozen handle) and ``send`` (the row all-to-all, for the tokens and for
any row-aligned lane such as the combine weights). A handle made with ``topk_weights_TK=None`` combines by a
plain sum over k: the expert side has already multiplied each row by its weight.

``dispatch`` returns a frozen ``DispatchHandle`` that ``combine`` consumes: the dispatcher keeps no per-call
state, so several dispatches can be in flight at once (the overlap pipeline relies on it). Permutation and
un-permutation are local; the only communication is in ``comm.py``.

Colocated experts (several on one rank): ``dispatch(..., local_slot_TK=, num_slots=L)`` sorts the assignments by
the "virtual destination" ``dest * L + slot`` and exchanges counts per (rank, slot), so each source's block of
received rows is itself grouped by slot and the handle's ``recv_slot_counts`` tells the receiver how many rows of
each block belong to each of its experts (``experts.LocalExperts``). The rows still travel in one all-to-all
with per-rank splits; no expert ids are sent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .comm import OnShared, ProcessGroup, all_to_all, exchange_count_rows, group_size


@dataclass(frozen=True)
class DispatchHandle:
    """What ``combine`` needs to undo a ``dispatch``.

    Attributes:
        order_A: int64 indices into the flattened T*K assignments of the rows sent, sorted by destination rank
            (stable, so rows to one rank stay in token order).
        topk_weights_TK: combine weights (float32, differentiable; 0 for dropped assignments); None when the rows
            come back already weighted (``combine`` then sums over k).
        send_splits: rows sent to each rank (length R).
        recv_splits: rows received from each rank (length R).
        num_tokens: T.
        recv_slot_counts: [R][L] rows received from each rank for each local expert slot, when the dispatch was
            given ``local_slot_TK``; None otherwise.
        recv_slot_counts_dev: the same on the device (int64 [R, L]), for device-side grouping by slot.
    """

    order_A: torch.Tensor
    topk_weights_TK: torch.Tensor | None
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    num_tokens: int
    recv_slot_counts: tuple[tuple[int, ...], ...] | None = None
    top_k: int = 0
    recv_slot_counts_dev: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.topk_weights_TK is None and self.top_k < 1:
            raise ValueError(f"DispatchHandle without topk_weights_TK needs top_k >= 1, got top_k={self.top_k}")


def permute_by_destination(
    dest_rank_TK: torch.Tensor, keep_TK: torch.Tensor, num_ranks: int, chunk_T: torch.Tensor | None = None,
    num_chunks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Order the assignments by destination rank (by (chunk, destination) when ``chunk_T`` is given), on the
    device: a sort and a scatter-add, no host sync (the number kept is known on the host only after the count
    exchange, so the dropped assignments are sorted last instead of removed).

    Args:
        dest_rank_TK: int64 destination of each assignment, in [0, num_ranks).
        keep_TK: bool, False for assignments dropped by capacity.
        chunk_T: int64 chunk of each token (non-decreasing), or None for one chunk.
    Returns:
        order_A: int64 [T*K] indices into the flattened assignments: the kept ones sorted by (chunk,) destination
            (stable, so rows to one rank stay in token order), then the dropped ones; the first
            ``send_counts.sum()`` are the rows to send.
        send_counts: int64 rows per destination rank [R], or per chunk and destination [C, R].
    """
    key_TK = dest_rank_TK if chunk_T is None else chunk_T.unsqueeze(1) * num_ranks + dest_rank_TK
    n = num_chunks * num_ranks
    key_A = torch.where(keep_TK, key_TK, n).reshape(-1)  # dropped: past every destination, so they sort last
    order_A = torch.sort(key_A, stable=True).indices
    counts = torch.zeros(n + 1, dtype=torch.int64, device=key_A.device).scatter_add_(0, key_A, torch.ones_like(key_A))
    return order_A, (counts[:n] if chunk_T is None else counts[:n].view(num_chunks, num_ranks))


def sum_over_k(rows_AH: torch.Tensor, order_A: torch.Tensor, num_tokens: int, top_k: int,
               weights_TK: torch.Tensor | None = None) -> torch.Tensor:
    """The combine's one reduction, for every dispatch path: put expert outputs back at their (token, k) slot and
    take y_TH[t] = sum_k weights_TK[t, k] * row of assignment (t, k), or the plain sum without weights (rows the
    expert side already weighted); assignments not in ``order_A`` count as 0.

    Index-copy into a [T*K, H] buffer then a sum over K (instead of an index_add over tokens) keeps the
    reduction order fixed, so results are deterministic on every device. The weighted sum saves only the rows
    (their own dtype), ``order_A`` and the weights for its backward: no float32 [T, K, H] copy is kept.

    Args:
        rows_AH: one row per entry of ``order_A``.
        order_A: int64 indices into the flattened [T*K] assignments.
        weights_TK: float32 weights (differentiable), or None.
    Returns:
        y_TH in the dtype of ``rows_AH`` (the sum is taken in float32).
    """
    if weights_TK is None:
        full = rows_AH.new_zeros((num_tokens * top_k, rows_AH.shape[-1])).index_copy(0, order_A, rows_AH)
        return full.view(num_tokens, top_k, rows_AH.shape[-1]).float().sum(dim=1).to(rows_AH.dtype)
    return _WeightedSumOverK.apply(rows_AH, order_A, weights_TK)


class _WeightedSumOverK(torch.autograd.Function):
    """``sum_over_k`` with weights, whose backward recomputes from the rows instead of saving float32 products."""

    @staticmethod
    def forward(ctx, rows_AH, order_A, weights_TK):  # type: ignore[override]
        t, k = weights_TK.shape
        full = rows_AH.new_zeros((t * k, rows_AH.shape[-1])).index_copy(0, order_A, rows_AH)
        y_TH = (full.view(t, k, rows_AH.shape[-1]).float() * weights_TK.float().unsqueeze(-1)).sum(dim=1)
        ctx.save_for_backward(rows_AH, order_A, weights_TK)
        return y_TH.to(rows_AH.dtype)

    @staticmethod
    def backward(ctx, grad_TH):  # type: ignore[override]
        rows_AH, order_A, weights_TK = ctx.saved_tensors
        t, k = weights_TK.shape
        grad_AH = grad_TH.float().index_select(0, order_A // k)  # each row's token's gradient
        grad_rows = grad_weights = None
        if ctx.needs_input_grad[0]:
            w_A = weights_TK.float().reshape(-1).index_select(0, order_A)
            grad_rows = (grad_AH * w_A.unsqueeze(-1)).to(rows_AH.dtype)
        if ctx.needs_input_grad[2]:
            dot_A = (grad_AH * rows_AH.float()).sum(dim=-1)
            grad_weights = dot_A.new_zeros(t * k).index_copy(0, order_A, dot_A).view(t, k).to(weights_TK.dtype)
        return grad_rows, None, grad_weights


def slot_key(dest_rank_TK: torch.Tensor, local_slot_TK: torch.Tensor | None, num_slots: int) -> torch.Tensor:
    """The sort key of an assignment: its destination rank, or with colocated experts the virtual destination
    ``dest * L + slot``, which groups each rank's rows by slot (counts then go per (rank, slot))."""
    return dest_rank_TK if local_slot_TK is None else dest_rank_TK * num_slots + local_slot_TK


class AllToAllDispatcher:
    """Flat all-to-all dispatcher over an EP group.

    Args:
        ep_group: the expert-parallel process group (None = default group).
    """

    def __init__(self, ep_group: ProcessGroup | None):
        self.ep_group = ep_group
        self.num_ranks = group_size(ep_group)

    def dispatch(
        self,
        x_TH: torch.Tensor,
        dest_rank_TK: torch.Tensor,
        keep_TK: torch.Tensor,
        topk_weights_TK: torch.Tensor,
        *,
        local_slot_TK: torch.Tensor | None = None,
        num_slots: int = 1,
        shared_X: torch.Tensor | None = None,
        on_shared: OnShared | None = None,
        during: Callable[[], None] | None = None,
    ) -> tuple[torch.Tensor, DispatchHandle]:
        """Send each kept (token, k) row to ``dest_rank_TK``.

        Args:
            x_TH: tokens.
            dest_rank_TK: int64 rank in the EP group that computes each assignment.
            keep_TK: bool, False for assignments dropped by capacity (they are not sent).
            topk_weights_TK: combine weights, kept in the handle for ``combine``.
            local_slot_TK: colocated experts only: int64 slot in [0, num_slots) of the assignment's expert on its
                destination rank. None: one expert per rank.
            num_slots: L, the most experts any rank holds (the slot dimension of the count exchange).
            shared_X, on_shared: numbers that ride along in the count exchange (``comm.exchange_count_rows``).
            during: local work to run while the rows are in flight (``comm.all_to_all``; the shared expert).
        Returns:
            rows_MH: received rows, grouped by source rank, each source's rows in its token order (with
                ``local_slot_TK``: grouped by slot inside each source's block, token order inside a slot).
            handle: the frozen metadata ``combine`` needs.
        """
        order_A, send_counts_V = self.route(dest_rank_TK, keep_TK, local_slot_TK=local_slot_TK, num_slots=num_slots)
        top_k = dest_rank_TK.shape[1] if dest_rank_TK.dim() == 2 else 1
        handle = self.exchange(
            order_A, send_counts_V, num_tokens=x_TH.shape[0], top_k=top_k, topk_weights_TK=topk_weights_TK,
            num_slots=None if local_slot_TK is None else num_slots, shared_X=shared_X, on_shared=on_shared,
        )
        return self.send(x_TH.index_select(0, handle.order_A // top_k), handle, during=during), handle

    def route(
        self,
        dest_rank_TK: torch.Tensor,
        keep_TK: torch.Tensor,
        *,
        local_slot_TK: torch.Tensor | None = None,
        num_slots: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Local: the order in which the kept assignments are sent, and the rows per destination.

        Returns:
            order_A: int64 [T*K] indices into the flattened assignments, the kept ones sorted by destination (and
                by slot inside a destination when ``local_slot_TK`` is given), then the dropped ones; row a sent is
                token ``order_A[a] // K``. ``exchange`` keeps the first ``sum(send_counts_V)`` (known on the host
                only after the count exchange) in the handle.
            send_counts_V: int64 rows per destination rank [R], or per (rank, slot) [R*L] with ``local_slot_TK``.
        """
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots={num_slots!r} must be an integer >= 1")
        slots = 1 if local_slot_TK is None else num_slots
        # The counts per (rank, slot) go in the one count exchange (all_to_all_single sends L of them to each rank).
        return permute_by_destination(slot_key(dest_rank_TK, local_slot_TK, slots), keep_TK, self.num_ranks * slots)

    def exchange(
        self,
        order_A: torch.Tensor,
        send_counts_V: torch.Tensor,
        *,
        num_tokens: int,
        top_k: int,
        topk_weights_TK: torch.Tensor | None,
        num_slots: int | None = None,
        shared_X: torch.Tensor | None = None,
        on_shared: OnShared | None = None,
    ) -> DispatchHandle:
        """Communication: exchange the counts of ``route`` and freeze what ``send``/``combine`` need.

        Args:
            num_slots: L of ``route`` when it was given ``local_slot_TK`` (the handle then carries
                ``recv_slot_counts``); None otherwise.
            topk_weights_TK: the combine weights, or None when the expert side weights the rows (then ``combine``
                sums over k).
            shared_X, on_shared: numbers that ride along (``comm.exchange_count_rows``).
        """
        slots = 1 if num_slots is None else num_slots
        # One host sync for both count lists: all_to_all_single needs the splits on the host.
        send_RL, recv_RL_lists, recv_dev_RL = exchange_count_rows(
            send_counts_V.view(self.num_ranks, slots), self.ep_group, shared_X=shared_X, on_shared=on_shared
        )
        recv_RL = tuple(tuple(row) for row in recv_RL_lists)
        send_splits = tuple(sum(row) for row in send_RL)
        return DispatchHandle(
            order_A=order_A[:sum(send_splits)],  # the rows sent; dropped assignments were sorted past them
            topk_weights_TK=topk_weights_TK,
            send_splits=send_splits,
            recv_splits=tuple(sum(c) for c in recv_RL),
            num_tokens=num_tokens,
            recv_slot_counts=None if num_slots is None else recv_RL,
            top_k=top_k,
            recv_slot_counts_dev=None if num_slots is None else recv_dev_RL,
        )

    def send(self, rows_AX: torch.Tensor, handle: DispatchHandle, *,
             during: Callable[[], None] | None = None) -> torch.Tensor:
        """Communication: the differentiable all-to-all of rows in ``route`` order (tokens, or any row-aligned
        lane such as the combine weights [A] or [A, 1]) to the destinations; returns the received [M, ...].
        ``during``: local work to run while they are in flight."""
        return all_to_all(rows_AX, handle.recv_splits, handle.send_splits, self.ep_group, during=during)

    def combine(self, rows_MH: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Send expert outputs back to their source ranks and reduce them to ``y_TH``."""
        back_AH = all_to_all(rows_MH, handle.send_splits, handle.recv_splits, self.ep_group)
        return sum_over_k(back_AH, handle.order_A, handle.num_tokens, handle.top_k, handle.topk_weights_TK)
