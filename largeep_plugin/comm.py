"""Token collectives: the only place where tokens cross ranks.

Shape legend:
    N  rows sent by this rank       M  rows received by this rank       H  hidden size
    R  ranks in the EP group

Everything else in the layer is local computation; the overlap scheduler relies on that contract.
``all_to_all_single`` with explicit split sizes is used throughout: it accepts uneven splits on NCCL and gloo
(the list form rejects uneven sizes on gloo).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup


def group_size(group: ProcessGroup | None) -> int:
    """Size of ``group`` (None = the default group), 1 when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    """This process's rank in ``group`` (None = the default group), 0 when not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def exchange_counts(send_counts_R: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Tell every rank how many rows it will receive from each rank.

    Args:
        send_counts_R: int64, rows this rank sends to each rank of ``group``.
    Returns:
        recv_counts_R: int64, rows this rank receives from each rank.
    """
    if group_size(group) == 1:
        return send_counts_R.clone()
    recv_counts_R = torch.empty_like(send_counts_R)
    dist.all_to_all_single(recv_counts_R, send_counts_R.contiguous(), group=group)
    return recv_counts_R


def _all_to_all_raw(
    x_NH: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int], group: ProcessGroup | None
) -> torch.Tensor:
    out = x_NH.new_empty((sum(output_splits),) + tuple(x_NH.shape[1:]))
    if group_size(group) == 1:
        out.copy_(x_NH)
        return out
    dist.all_to_all_single(out, x_NH.contiguous(), list(output_splits), list(input_splits), group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward is the reverse all_to_all (splits swapped)."""

    @staticmethod
    def forward(ctx, x_NH, output_splits, input_splits, group):  # type: ignore[override]
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return _all_to_all_raw(x_NH, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad_MH):  # type: ignore[override]
        grad_NH = _all_to_all_raw(grad_MH, ctx.input_splits, ctx.output_splits, ctx.group)
        return grad_NH, None, None, None


def all_to_all(
    x_NH: torch.Tensor,
    output_splits: Sequence[int],
    input_splits: Sequence[int],
    group: ProcessGroup | None,
) -> torch.Tensor:
    """Differentiable all-to-all with uneven splits.

    Args:
        x_NH: rows to send, grouped by destination rank in rank order.
        output_splits: rows received from each rank (length R, sums to M).
        input_splits: rows sent to each rank (length R, sums to N).
    Returns:
        rows_MH: received rows, grouped by source rank in rank order.
    """
    return _AllToAll.apply(x_NH, tuple(output_splits), tuple(input_splits), group)
