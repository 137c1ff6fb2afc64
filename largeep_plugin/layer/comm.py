"""Token collectives: the only place where tokens cross ranks.

Shape legend:
    N  rows sent by this rank       M  rows received by this rank       H  hidden size
    R  ranks in the EP group

Everything else in the layer is local computation; the overlap scheduler relies on that contract.
``all_to_all_single`` with explicit split sizes is used throughout: it accepts uneven splits on NCCL and gloo
(the list form rejects uneven sizes on gloo).

    exchange_rows                        rows that are not tokens: clone weights and their gradients (clones.py)
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
# ``on_shared(flags_R, sums_X, host_sums)``: what rode along in a count exchange (``exchange_count_rows``).
OnShared = Callable[[list[int], torch.Tensor, "list[int] | None"], None]


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


def settle(group: ProcessGroup | None = None) -> None:
    """A barrier over ``group`` that keeps no reference to earlier work: an all_reduce of one number.

    Use it instead of ``dist.barrier()`` after object collectives (``gather_object``, ``all_gather_object``). Gloo's
    barrier holds the work still in progress on its worker threads, so that a worker thread may be the one that
    frees an object collective's work, whose tensors hold Python memory (the pickled bytes) and need the GIL to go.
    If the process group is destroyed then (the last Python reference dropped: ``~ProcessGroupGloo`` joins its
    worker threads with the GIL held) the rank hangs, or aborts in interpreter teardown ("terminate called without
    an active exception"): seen at the end of ``examples/train_hf_torchrun.py --save`` on busy cores."""
    if not (dist.is_available() and dist.is_initialized()) or group_size(group) == 1:
        return
    device = None  # gloo: the CPU; a backend for an accelerator (NCCL) takes the current one
    if dist.get_backend(group) != "gloo" and torch.accelerator.is_available():
        device = torch.device(torch.accelerator.current_accelerator().type, torch.accelerator.current_device_index())
    dist.all_reduce(torch.zeros(1, device=device), group=group)


def end_process(code: int = 0) -> None:
    """End a distributed training process: destroy the process groups, flush, and leave without the interpreter's
    teardown (``os._exit``). Call it last, on every rank, once the run's collectives are done.

    Why not just return: gloo's worker threads may still hold the last reference to a finished collective (they
    drop it just after running it), and when that collective's tensors were created in Python, freeing them needs
    the GIL. The last Python reference to a process group dropped on the main thread (a local going out of scope,
    or interpreter teardown) runs ``~ProcessGroupGloo``, which joins those threads with the GIL held: on busy cores
    the rank hangs there, or aborts in teardown ("terminate called without an active exception", SIGABRT), and
    torchrun reports the job failed. ``destroy_process_group`` alone does not join them (gloo's ``shutdown``
    keeps its threads), so the process leaves before any destructor runs."""
    import logging
    import os
    import sys

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


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


def exchange_rows(x_NP: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int],
                  group: ProcessGroup | None) -> torch.Tensor:
    """A non-differentiable all-to-all of rows with uneven splits, for what is not tokens: the weights of clones
    after an optimizer step and their gradients in backward (``clones.py``)."""
    return _all_to_all_raw(x_NP, output_splits, input_splits, group)


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

    The lanes travel as one buffer in the first lane's dtype, the others reinterpreted bit for bit (a float32
    metadata lane rides in a bf16 token buffer as twice as many bf16 numbers): a token and its metadata cost one
    collective, not one per dtype. Returns the received lanes in the input order, each in its own dtype.
    ``during``: as ``all_to_all``, run while the buffer is in flight.
    """
    pending = None
    if during is not None:  # started outside autograd, so that during() runs under the caller's autograd mode
        pending = start_all_to_all_lanes([t.detach() for t in lanes], output_splits, input_splits, group)
        during()
    return list(_AllToAllLanes.apply(tuple(output_splits), tuple(input_splits), group, pending, *lanes))


class _AllToAllLanes(torch.autograd.Function):
    """``_lanes_raw`` (or the lanes of an exchange already in flight, ``pending``) whose backward is the reverse
    exchange of the lanes' gradients, one buffer again."""

    @staticmethod
    def forward(ctx, output_splits, input_splits, group, pending, *lanes):  # type: ignore[override]
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = pending.wait() if pending is not None else _lanes_raw(lanes, output_splits, input_splits, group)
        ctx.received = [(t.shape, t.dtype, t.device) for t in out]
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        # Every rank exchanges every lane (zeros where no gradient came), so the collectives match across ranks.
        full = [g if g is not None else torch.zeros(shape, dtype=dtype, device=device)
                for g, (shape, dtype, device) in zip(grads, ctx.received)]
        back = _lanes_raw(full, ctx.splits[1], ctx.splits[0], ctx.group)
        return (None, None, None, None, *(b if need else None for b, need in zip(back, ctx.needs_input_grad[4:])))


def _lanes_raw(lanes: Sequence[torch.Tensor], output_splits: Sequence[int], input_splits: Sequence[int],
               group: ProcessGroup | None) -> list[torch.Tensor]:
    out: list[torch.Tensor | None] = [None] * len(lanes)
    for idx, carrier in _carrier_groups(lanes):
        merged, widths = _pack(lanes, idx, carrier)
        got = _all_to_all_raw(merged, output_splits, input_splits, group)
        for i, part in zip(idx, _unpack(got, widths, [lanes[i].dtype for i in idx])):
            out[i] = part
    return out  # type: ignore[return-value]


def exchange_chunk_counts(
    send_RCW: torch.Tensor,
    num_tokens: int,
    group: ProcessGroup | None,
    device: torch.device | None = None,
    *,
    shared_X: torch.Tensor | None = None,
    on_shared: OnShared | None = None,
) -> tuple[torch.Tensor, list[int], torch.Tensor, torch.Tensor]:
    """One collective that carries every count a chunked dispatch needs, plus each rank's token count.

    Args:
        send_RCW: int64 [R, C, W]: W counts per chunk that this rank tells each rank.
        num_tokens: T of this rank, told to every rank (the overlap pipeline clamps its chunks to the largest T).
        device: where the collective runs (the tokens' device: NCCL needs GPU tensors); default: send_RCW's.
        shared_X, on_shared: as ``exchange_count_rows``.
    Returns:
        recv_RCW: int64 [R, C, W]: what each rank told this rank.
        tokens_R: T of every rank.
        sent_RCW: ``send_RCW`` on the host, read in the same single host sync (for callers whose counts live on
            the device).
        recv_counts_RCW: ``recv_RCW`` on the device (no host-to-device copy).
    """
    r, c, w = send_RCW.shape
    packed = torch.cat([send_RCW.reshape(r, c * w), send_RCW.new_full((r, 1), num_tokens)], dim=1)
    sent, recv, recv_dev = exchange_count_rows(packed, group, device=device, shared_X=shared_X, on_shared=on_shared)
    # Host tensors (no device): the pipeline plans its splits from them on the host.
    recv_RCW = torch.tensor([row[:-1] for row in recv], dtype=torch.int64).reshape(r, c, w)
    sent_RCW = torch.tensor([row[:-1] for row in sent], dtype=torch.int64).reshape(r, c, w)
    return recv_RCW, [row[-1] for row in recv], sent_RCW, recv_dev[:, :-1].reshape(r, c, w)


def read_back(counts: torch.Tensor) -> list[int]:
    """The host sync of a dispatch: ``counts`` (int64, 1-D) as Python ints. Every read of device data by the host
    on the layer's forward goes through here, once per dispatch (twice on the node-batched path, whose stage-2
    counts depend on stage 1), so that tests can count it."""
    return counts.tolist()


def exchange_count_rows(
    send_RP: torch.Tensor,
    group: ProcessGroup | None,
    *,
    device: torch.device | None = None,
    shared_X: torch.Tensor | None = None,
    on_shared: OnShared | None = None,
) -> tuple[list[list[int]], list[list[int]], torch.Tensor]:
    """The one count collective of a dispatch: rank s tells rank d row d of its ``send_RP`` (P counts).

    ``shared_X`` (int64 [X], X >= 1, optional) rides along, the same X numbers to every rank, so a layer's
    per-expert load, drops and input check need no collective of their own. Its first X - 1 numbers are summed
    over the group on the device (the global load), and the sums come to the host in the same read-back (the
    planner of dynamic replicas reads them there: no sync of its own); its last is a flag that every rank reads
    back, per rank, with the counts (the input check: a bad input anywhere is an error everywhere).
    ``on_shared(flags_R, sums, host_sums)`` gets them right after the host sync, before any token moves (``sums``
    on the device, ``host_sums`` the same as ints; None when X = 1): a callback that raises does so on every rank at
    the same point. One ``all_to_all_single`` of R*(P+X) int64 and one host sync (``read_back``) of
    2*R*P + R + X - 1 numbers: O(R * P + X) host work.

    Args:
        device: where the collective runs (the tokens' device: NCCL needs GPU tensors); default: send_RP's.
    Returns:
        sent_RP, recv_RP: host lists [R][P]: what this rank told each rank, what each rank told this rank.
        recv_counts_RP: the same received counts on the device (int64 [R, P]), for device-side bookkeeping
            without a host-to-device copy.
    """
    r, p = send_RP.shape
    payload = send_RP.to(device or send_RP.device)
    if shared_X is not None:
        if shared_X.dim() != 1 or shared_X.numel() < 1:
            raise ValueError(f"shared_X must be int64 [X] with X >= 1 (the last entry is the flag), got "
                             f"{tuple(shared_X.shape)}")
        payload = torch.cat([payload, shared_X.to(payload.device).expand(r, -1)], dim=1)
    recv = exchange_counts(payload, group)
    parts = [payload[:, :p].reshape(-1), recv[:, :p].reshape(-1)]
    sums = None
    if shared_X is not None:
        parts.append(recv[:, -1])
        sums = recv[:, p:-1].sum(dim=0)
        parts.append(sums)
    host = read_back(torch.cat(parts))  # the one host sync
    sent = [host[i * p:(i + 1) * p] for i in range(r)]
    got = [host[(r + i) * p:(r + i + 1) * p] for i in range(r)]
    if on_shared is not None and shared_X is not None:
        host_sums = host[2 * r * p + r:]
        on_shared(host[2 * r * p:2 * r * p + r], sums, host_sums if host_sums else None)
    return sent, got, recv[:, :p]


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


def start_all_reduce(x: torch.Tensor, group: ProcessGroup | None) -> PendingAllToAll:
    """Start a sum of ``x`` over ``group`` in place (no autograd) and return at once; ``wait()`` returns ``x``.

    On CPU the backend progresses it on its own threads; on an accelerator ``wait()`` makes the current stream
    wait for it, so the host never blocks. For numbers the forward needs only at its end (the global load of
    a large EP group): issued before the token all-to-all, waited after the combine."""
    if group_size(group) == 1:
        return PendingAllToAll(x, (), None)
    work = dist.all_reduce(x, group=group, async_op=True)
    return PendingAllToAll(x, (), work.wait)


# Above this many numbers (R ranks x the per-expert load) the load leaves the count exchange for an all_reduce of
# its own: the exchange would carry R copies of it to every rank (8 MB per layer at R = E = 1024), where a sum over
# the group moves O(E) per rank and overlaps the dispatch.
LOAD_IN_EXCHANGE_LIMIT = 1 << 16


def load_rides_in_count_exchange(ep_size: int, load_numbers: int) -> bool:
    """Whether a layer's per-expert load (``load_numbers`` per rank) rides in the count exchange (small groups:
    no collective of its own) or goes in its own asynchronous all_reduce (large groups)."""
    return ep_size * load_numbers <= LOAD_IN_EXCHANGE_LIMIT


class LoadRide:
    """A layer's load [X] (per-expert counts, drops) summed over ``group`` on the device, and its input flag [1]:
    ``shared_X`` is what to send along in the count exchange (load and flag for small groups, the flag alone for
    large ones, whose load goes in its own asynchronous all_reduce, started here). Inside ``on_shared`` call
    ``take(sums_X)``; after the dispatch ``total()`` is the summed load, on the device."""

    def __init__(self, load_X: torch.Tensor, flag_1: torch.Tensor, group: ProcessGroup | None, ep_size: int):
        self.fold = load_rides_in_count_exchange(ep_size, load_X.numel())
        self.shared_X = torch.cat([load_X, flag_1]) if self.fold else flag_1
        self._pending = None if self.fold else start_all_reduce(load_X.clone(), group)
        self._sums: torch.Tensor | None = None

    def take(self, sums_X: torch.Tensor) -> None:
        if self.fold:
            self._sums = sums_X

    def total(self) -> torch.Tensor:
        return self._sums if self.fold else self._pending.wait()  # type: ignore[union-attr,return-value]


class PendingLanes:
    """Several lanes in flight (one collective per carrier dtype, see ``_carrier_groups``); ``wait()`` returns them
    in the order given, each in its own dtype."""

    def __init__(self, parts: list[tuple[list[int], list[int], list[torch.dtype], PendingAllToAll]], num_lanes: int):
        self._parts = parts
        self._num_lanes = num_lanes

    def wait(self) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * self._num_lanes
        for idx, widths, dtypes, pending in self._parts:
            for i, part in zip(idx, _unpack(pending.wait(), widths, dtypes)):
                out[i] = part
        return out  # type: ignore[return-value]


def start_all_to_all_lanes(
    lanes: Sequence[torch.Tensor],
    output_splits: Sequence[int],
    input_splits: Sequence[int],
    group: ProcessGroup | None,
    comm_stream: CommStream | None = None,
) -> PendingLanes:
    """``start_all_to_all`` for several row-aligned 2-D lanes; they travel as one buffer (see ``all_to_all_lanes``)."""
    parts = []
    for idx, carrier in _carrier_groups(lanes):
        merged, widths = _pack(lanes, idx, carrier)
        dtypes = [lanes[i].dtype for i in idx]
        parts.append((idx, widths, dtypes, start_all_to_all(merged, output_splits, input_splits, group, comm_stream)))
    return PendingLanes(parts, len(lanes))


def _carrier_groups(lanes: Sequence[torch.Tensor]) -> list[tuple[list[int], torch.dtype]]:
    """Which lanes travel together, and as what dtype: every lane whose rows are a whole number of the first
    lane's elements rides with it, bit for bit; any other lane goes with the lanes of its own dtype."""
    for i, t in enumerate(lanes):
        if t.dim() != 2:
            raise ValueError(f"lane {i} has shape {tuple(t.shape)}: lanes must be 2-D [rows, width]")
    if not lanes:
        return []
    carrier, size = lanes[0].dtype, lanes[0].element_size()
    groups: dict[torch.dtype, list[int]] = {carrier: []}
    for i, t in enumerate(lanes):
        fits = (t.shape[1] * t.element_size()) % size == 0
        groups.setdefault(carrier if fits else t.dtype, []).append(i)
    return [(idx, dtype) for dtype, idx in groups.items() if idx]


def _pack(lanes: Sequence[torch.Tensor], idx: Sequence[int], carrier: torch.dtype) -> tuple[torch.Tensor, list[int]]:
    """The lanes ``idx`` as one [rows, sum(widths)] buffer of ``carrier``; widths in carrier elements."""
    views = [lanes[i] if lanes[i].dtype == carrier else lanes[i].contiguous().view(carrier) for i in idx]
    merged = views[0] if len(views) == 1 else torch.cat(views, dim=1)
    return merged, [v.shape[1] for v in views]


def _unpack(got: torch.Tensor, widths: Sequence[int], dtypes: Sequence[torch.dtype]) -> list[torch.Tensor]:
    """Undo ``_pack`` on the received buffer: each lane back in its own dtype."""
    parts = torch.split(got, list(widths), dim=1)
    return [p if p.dtype == d else p.contiguous().view(d) for p, d in zip(parts, dtypes)]
