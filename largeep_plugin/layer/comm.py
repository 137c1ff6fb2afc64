"""Token collectives: the only place where tokens cross ranks.

Shape legend:
    N  rows sent by this rank       M  rows received by this rank       H  hidden size
    R  ranks in the EP group

Everything else in the layer is local computation; the overlap scheduler relies on that contract.
``all_to_all_single`` with explicit split sizes is used throughout: it accepts uneven splits on NCCL and gloo
(the list form rejects uneven sizes on gloo).

    all_to_all / all_to_all_lanes        differentiable, blocking (the plain dispatchers); ``during=fn`` runs
                                         local work (the shared expert) while the rows are in flight
    start_all_to_all / ..._lanes         no autograd, returns at once; ``.wait()`` later (the overlap pipeline):
                                         a gloo work handle on CPU, a side stream + events on accelerators
    exchange_counts / exchange_count_rows / exchange_chunk_counts
                                         the small count exchange that plans the splits (one per dispatch; it
                                         can carry the layer's load statistics and input checks along)
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

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


class _Arrived(torch.autograd.Function):
    """The rows of an all-to-all started without autograd (``start_all_to_all``), joined to the graph when they
    arrive: forward waits for them; backward is the reverse all-to-all (splits swapped), as ``_AllToAll``'s."""

    @staticmethod
    def forward(ctx, x_NH, pending, output_splits, input_splits, group):  # type: ignore[override]
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return pending.wait()

    @staticmethod
    def backward(ctx, grad_MH):  # type: ignore[override]
        return _all_to_all_raw(grad_MH, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None, None


def all_to_all(
    x_NH: torch.Tensor,
    output_splits: Sequence[int],
    input_splits: Sequence[int],
    group: ProcessGroup | None,
    *,
    during: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Differentiable all-to-all with uneven splits.

    Args:
        x_NH: rows to send, grouped by destination rank in rank order.
        output_splits: rows received from each rank (length R, sums to M).
        input_splits: rows sent to each rank (length R, sums to N).
        during: local work (no communication on this group) to run while the rows are in flight: the collective
            is started asynchronously, ``during()`` runs under the caller's autograd mode, then the rows are
            waited for. Backward is unchanged (the reverse all-to-all).
    Returns:
        rows_MH: received rows, grouped by source rank in rank order.
    """
    if during is None:
        return _AllToAll.apply(x_NH, tuple(output_splits), tuple(input_splits), group)
    pending = start_all_to_all(x_NH.detach(), output_splits, input_splits, group)
    during()
    return _Arrived.apply(x_NH, pending, tuple(output_splits), tuple(input_splits), group)


def all_to_all_lanes(
    lanes: Sequence[torch.Tensor],
    output_splits: Sequence[int],
    input_splits: Sequence[int],
    group: ProcessGroup | None,
    *,
    during: Callable[[], None] | None = None,
) -> list[torch.Tensor]:
    """Differentiable all-to-all of several row-aligned 2-D tensors with the same splits.

    Lanes of one dtype travel as one buffer (concatenated along dim 1), so a token and its metadata cost one
    collective, not two. Returns the received lanes in the input order. ``during``: as ``all_to_all``, run
    while the first buffer is in flight.
    """
    out: list[torch.Tensor | None] = [None] * len(lanes)
    for n, idx in enumerate(_lanes_by_dtype(lanes)):
        merged = lanes[idx[0]] if len(idx) == 1 else torch.cat([lanes[i] for i in idx], dim=1)
        got = all_to_all(merged, output_splits, input_splits, group, during=during if n == 0 else None)
        for i, part in zip(idx, torch.split(got, [lanes[i].shape[1] for i in idx], dim=1)):
            out[i] = part
    return out  # type: ignore[return-value]


def exchange_chunk_counts(
    send_RCW: torch.Tensor, num_tokens: int, group: ProcessGroup | None, device: torch.device | None = None
) -> tuple[torch.Tensor, list[int]]:
    """One collective that carries every count a chunked dispatch needs, plus each rank's token count.

    Args:
        send_RCW: int64 [R, C, W]: W counts per chunk that this rank tells each rank.
        num_tokens: T of this rank, told to every rank (the overlap pipeline clamps its chunks to the largest T).
        device: where the collective runs (the tokens' device: NCCL needs GPU tensors); default: send_RCW's.
    Returns:
        recv_RCW: int64 [R, C, W]: what each rank told this rank.
        tokens_R: T of every rank.
    """
    recv_RCW, tokens_R, _ = exchange_chunk_counts_with_sent(send_RCW, num_tokens, group, device)
    return recv_RCW, tokens_R


def exchange_chunk_counts_with_sent(
    send_RCW: torch.Tensor,
    num_tokens: int,
    group: ProcessGroup | None,
    device: torch.device | None = None,
    *,
    shared_X: torch.Tensor | None = None,
    on_shared: Callable[[list[list[int]]], None] | None = None,
) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """``exchange_chunk_counts`` that also returns ``send_RCW`` on the host, read in the same single host sync
    (for callers whose counts live on the device). ``shared_X`` / ``on_shared``: as ``exchange_count_rows``."""
    r, c, w = send_RCW.shape
    packed = torch.cat([send_RCW.reshape(r, c * w), send_RCW.new_full((r, 1), num_tokens)], dim=1)
    sent, recv = exchange_count_rows(packed, group, device=device, shared_X=shared_X, on_shared=on_shared)
    recv_RCW = torch.tensor([row[:-1] for row in recv], dtype=torch.int64).reshape(r, c, w)
    sent_RCW = torch.tensor([row[:-1] for row in sent], dtype=torch.int64).reshape(r, c, w)
    return recv_RCW, [row[-1] for row in recv], sent_RCW


def exchange_count_rows(
    send_RP: torch.Tensor,
    group: ProcessGroup | None,
    *,
    device: torch.device | None = None,
    shared_X: torch.Tensor | None = None,
    on_shared: Callable[[list[list[int]]], None] | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """The one count collective of a dispatch: rank s tells rank d row d of its ``send_RP`` (P counts).

    ``shared_X`` (int64 [X], optional) rides along: the same X numbers to every rank, so a layer's per-expert
    load, drops and input checks need no collective of their own; every rank then receives all ranks' rows and
    ``on_shared`` gets them (host lists [R][X], rank order) right after the host sync, before any token moves: a
    callback that raises does so on every rank at the same point. One ``all_to_all_single`` of R*(P+X) int64 and
    one host sync.

    Args:
        device: where the collective runs (the tokens' device: NCCL needs GPU tensors); default: send_RP's.
    Returns:
        sent_RP, recv_RP: host lists [R][P]: what this rank told each rank, what each rank told this rank.
    """
    p = send_RP.shape[1]
    payload = send_RP.to(device or send_RP.device)
    if shared_X is not None:
        payload = torch.cat([payload, shared_X.to(payload.device).expand(payload.shape[0], -1)], dim=1)
    sent, recv = torch.stack([payload, exchange_counts(payload, group)]).tolist()  # one host sync
    if on_shared is not None:
        on_shared([row[p:] for row in recv])
    return [row[:p] for row in sent], [row[:p] for row in recv]


# ---- asynchronous all-to-all (the overlap pipeline) ---------------------------------------------------------------
class PendingAllToAll:
    """An all-to-all in flight. ``wait()`` blocks until it is done (CPU) or makes the compute stream wait for it
    (accelerators), then returns the received rows."""

    def __init__(self, out: torch.Tensor, keep_alive: tuple[Any, ...], wait_fn: Callable[[], None] | None):
        self._out = out
        self._keep_alive = keep_alive  # the send buffer must outlive the collective
        self._wait_fn = wait_fn

    def wait(self) -> torch.Tensor:
        if self._wait_fn is not None:
            self._wait_fn()
            self._wait_fn = None
            self._keep_alive = ()
        return self._out


class CommStream:
    """The side stream that token collectives run on, for one accelerator device.

    Built with the device-generic ``torch.Stream`` / ``torch.Event`` API: the collective waits for an event
    recorded on the compute stream (its input is ready), runs on this stream, and the compute stream waits for an
    event recorded after it, so the host never blocks and compute of another chunk runs meanwhile.
    """

    def __init__(self, device: torch.device):
        if device.type == "cpu":
            raise ValueError("CommStream is for accelerator devices; on CPU the collectives are asynchronous work handles")
        self.device = device
        self.stream = torch.Stream(device=device)

    def compute_stream(self) -> torch.Stream:
        return torch.accelerator.current_stream(self.device)


def start_all_to_all(
    x_NH: torch.Tensor,
    output_splits: Sequence[int],
    input_splits: Sequence[int],
    group: ProcessGroup | None,
    comm_stream: CommStream | None = None,
) -> PendingAllToAll:
    """Start an all-to-all (no autograd: the overlap pipeline does its own backward) and return at once.

    On CPU the collective is an ``async_op`` work handle that the backend progresses on its own threads; on an
    accelerator it is issued on ``comm_stream``. With one rank the rows are copied (on the comm stream when
    there is one, so the copy still overlaps compute).
    """
    send = x_NH.contiguous()
    out = send.new_empty((sum(output_splits),) + tuple(send.shape[1:]))
    single = group_size(group) == 1
    if comm_stream is None:
        if single:
            out.copy_(send)
            return PendingAllToAll(out, (), None)
        work = dist.all_to_all_single(
            out, send, list(output_splits), list(input_splits), group=group, async_op=True
        )
        return PendingAllToAll(out, (send,), work.wait)
    compute = comm_stream.compute_stream()
    side = comm_stream.stream
    side.wait_event(compute.record_event())
    with side:
        if single:
            out.copy_(send)
        else:
            dist.all_to_all_single(out, send, list(output_splits), list(input_splits), group=group)
    done = side.record_event()
    # Both buffers were allocated on the compute stream and used on the side stream: tell the caching allocator.
    send.record_stream(side)
    out.record_stream(side)
    return PendingAllToAll(out, (send,), lambda: compute.wait_event(done))


class PendingLanes:
    """Several lanes in flight (one collective per dtype); ``wait()`` returns them in the order given."""

    def __init__(self, parts: list[tuple[list[int], list[int], PendingAllToAll]], num_lanes: int):
        self._parts = parts
        self._num_lanes = num_lanes

    def wait(self) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * self._num_lanes
        for idx, widths, pending in self._parts:
            for i, part in zip(idx, torch.split(pending.wait(), widths, dim=1)):
                out[i] = part
        return out  # type: ignore[return-value]


def start_all_to_all_lanes(
    lanes: Sequence[torch.Tensor],
    output_splits: Sequence[int],
    input_splits: Sequence[int],
    group: ProcessGroup | None,
    comm_stream: CommStream | None = None,
) -> PendingLanes:
    """``start_all_to_all`` for several row-aligned 2-D lanes; lanes of one dtype travel as one buffer."""
    parts = []
    for idx in _lanes_by_dtype(lanes):
        merged = lanes[idx[0]] if len(idx) == 1 else torch.cat([lanes[i] for i in idx], dim=1)
        widths = [lanes[i].shape[1] for i in idx]
        parts.append((idx, widths, start_all_to_all(merged, output_splits, input_splits, group, comm_stream)))
    return PendingLanes(parts, len(lanes))


def _lanes_by_dtype(lanes: Sequence[torch.Tensor]) -> list[list[int]]:
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(lanes):
        if t.dim() != 2:
            raise ValueError(f"lane {i} has shape {tuple(t.shape)}: lanes must be 2-D [rows, width]")
        groups.setdefault(t.dtype, []).append(i)
    return list(groups.values())
