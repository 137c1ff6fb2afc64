"""Dispatch tokens to the ranks that hold their experts, and combine the results.

Shape legend:
    T  tokens on this rank      K  top_k          H  hidden size       R  ranks in the EP group
    A  kept (token, expert) assignments of this rank (A <= T*K; A < T*K only when capacity drops some)
    M  rows this rank receives

    rows_MH, handle = dispatcher.dispatch(x_TH, dest_rank_TK, keep_TK, topk_weights_TK)
    y_TH = dispatcher.combine(expert(rows_MH), handle)

``dispatch`` returns a frozen ``DispatchHandle`` that ``combine`` consumes: the dispatcher keeps no per-call
state, so several dispatches can be in flight at once (the overlap pipeline relies on it). Permutation and
un-permutation are local; the only communication is in ``comm.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .comm import ProcessGroup, all_to_all, exchange_counts, group_size


@dataclass(frozen=True)
class DispatchHandle:
    """What ``combine`` needs to undo a ``dispatch``.

    Attributes:
        order_A: int64 indices into the flattened T*K assignments, the kept ones sorted by destination rank
            (stable, so rows to one rank stay in token order).
        topk_weights_TK: combine weights (float32, differentiable; 0 for dropped assignments).
        send_splits: rows sent to each rank (length R).
        recv_splits: rows received from each rank (length R).
        num_tokens: T.
    """

    order_A: torch.Tensor
    topk_weights_TK: torch.Tensor
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    num_tokens: int


def permute_by_destination(dest_rank_TK: torch.Tensor, keep_TK: torch.Tensor, num_ranks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order the kept assignments by destination rank.

    Returns:
        order_A: int64 indices into the flattened [T*K] assignments.
        send_counts_R: int64 rows per destination rank.
    """
    flat_dest = dest_rank_TK.reshape(-1)
    kept = torch.nonzero(keep_TK.reshape(-1), as_tuple=True)[0]
    order_A = kept[torch.sort(flat_dest[kept], stable=True).indices]
    send_counts_R = torch.bincount(flat_dest[order_A], minlength=num_ranks)
    return order_A, send_counts_R


def unpermute_and_reduce(rows_AH: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
    """Put expert outputs back at their (token, k) slot and take the weighted sum over k.

    Index-copy into a [T*K, H] buffer then a sum over K (instead of an index_add over tokens) keeps the
    reduction order fixed, so results are deterministic on every device.
    """
    return weighted_sum_over_k(rows_AH, handle.order_A, handle.topk_weights_TK)


def weighted_sum_over_k(rows_AH: torch.Tensor, order_A: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """y_TH[t] = sum_k weights_TK[t, k] * row of assignment (t, k); assignments not in ``order_A`` count as 0.

    Args:
        rows_AH: one row per entry of ``order_A``.
        order_A: int64 indices into the flattened [T*K] assignments.
        weights_TK: float32 weights (differentiable).
    Returns:
        y_TH in the dtype of ``rows_AH`` (the sum is taken in float32).
    """
    t, k = weights_TK.shape
    full = rows_AH.new_zeros((t * k, rows_AH.shape[-1])).index_copy(0, order_A, rows_AH)
    y_TH = (full.view(t, k, rows_AH.shape[-1]).float() * weights_TK.unsqueeze(-1)).sum(dim=1)
    return y_TH.to(rows_AH.dtype)


def permute_by_chunk_and_destination(
    dest_rank_TK: torch.Tensor, keep_TK: torch.Tensor, num_ranks: int, chunk_T: torch.Tensor, num_chunks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``permute_by_destination`` for a batch cut into chunks: assignments sorted by (chunk, destination rank).

    Args:
        chunk_T: int64 chunk of each token (non-decreasing).
    Returns:
        order_A: int64 indices into the flattened [T*K] assignments, chunk-major.
        send_counts_CR: int64 rows per chunk and destination rank.
    """
    key = (chunk_T.unsqueeze(1) * num_ranks + dest_rank_TK).reshape(-1)
    kept = torch.nonzero(keep_TK.reshape(-1), as_tuple=True)[0]
    order_A = kept[torch.sort(key[kept], stable=True).indices]
    counts = torch.bincount(key[order_A], minlength=num_chunks * num_ranks)
    return order_A, counts.view(num_chunks, num_ranks)


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
    ) -> tuple[torch.Tensor, DispatchHandle]:
        """Send each kept (token, k) row to ``dest_rank_TK``.

        Args:
            x_TH: tokens.
            dest_rank_TK: int64 rank in the EP group that computes each assignment.
            keep_TK: bool, False for assignments dropped by capacity (they are not sent).
            topk_weights_TK: combine weights, kept in the handle for ``combine``.
        Returns:
            rows_MH: received rows, grouped by source rank, each source's rows in its token order.
            handle: the frozen metadata ``combine`` needs.
        """
        order_A, send_counts_R = permute_by_destination(dest_rank_TK, keep_TK, self.num_ranks)
        recv_counts_R = exchange_counts(send_counts_R, self.ep_group)
        # One host sync for both split lists: all_to_all_single needs them on the host.
        splits = torch.stack([send_counts_R, recv_counts_R]).tolist()
        handle = DispatchHandle(
            order_A=order_A,
            topk_weights_TK=topk_weights_TK,
            send_splits=tuple(splits[0]),
            recv_splits=tuple(splits[1]),
            num_tokens=x_TH.shape[0],
        )
        top_k = dest_rank_TK.shape[1] if dest_rank_TK.dim() == 2 else 1
        send_AH = x_TH.index_select(0, order_A // top_k)
        rows_MH = all_to_all(send_AH, handle.recv_splits, handle.send_splits, self.ep_group)
        return rows_MH, handle

    def combine(self, rows_MH: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Send expert outputs back to their source ranks and reduce them to ``y_TH``."""
        back_AH = all_to_all(rows_MH, handle.send_splits, handle.recv_splits, self.ep_group)
        return unpermute_and_reduce(back_AH, handle)
