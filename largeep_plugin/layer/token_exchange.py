"""The layer's steps 3-5 (dispatch, expert, combine), chosen by the dispatch config: the plain dispatchers
(``dispatcher.py`` flat, ``hierarchical.py`` node-batched) or, with ``overlap_chunks`` > 1, the same token movement
written as chunk programs for the overlap scheduler (``overlap.py``).

Shape legend:
    T  tokens of this rank      K  top_k        H  hidden size       R  ranks in the EP group      C  chunks
    A  kept (token, expert) assignments of this rank, chunk-major       L  expert slots per rank (colocated)
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from .comm import OnShared, ProcessGroup, exchange_chunk_counts, group_rank, group_size
from .config import DispatchConfig
from .dispatcher import AllToAllDispatcher, permute_by_destination, slot_key, sum_over_k
from .hierarchical import (
    HierarchicalDispatcher,
    NodeLayout,
    gateway_expand,
    gateway_reduce,
    pack_by_node,
    source_reduce,
    stage1_meta,
    stage1_rows_per_chunk,
    stage_splits,
)
from .overlap import ChunkProgram, Exchange, Local, SideJob, chunk_of_tokens, effective_chunks, run_pipeline
from .process_groups import NodeGroups
from largeep_plugin.placement.topology import as_int


def pipelined_exchange(
    x_TH: torch.Tensor,
    dest_rank_TK: torch.Tensor,
    keep_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    expert: nn.Module,
    *,
    group: ProcessGroup | None,
    num_chunks: int,
    layout: NodeLayout | None = None,
    node_groups: NodeGroups | None = None,
    local_slot_TK: torch.Tensor | None = None,
    num_slots: int = 1,
    shared_X: torch.Tensor | None = None,
    on_shared: OnShared | None = None,
    side: SideJob | None = None,
) -> torch.Tensor:
    """Dispatch, expert and combine of a whole batch, pipelined over ``num_chunks`` chunks.

    Args:
        x_TH, dest_rank_TK, keep_TK, topk_weights_TK: as ``AllToAllDispatcher.dispatch``.
        expert: this rank's expert MLP (colocated: ``experts.LocalExperts``, called with the chunk's counts).
        layout: None for the flat all-to-all, a ``NodeLayout`` for the node-batched one.
        node_groups: node-batched only: run stage 1 on the rail group and stage 2 on the node group (None: both
            over ``group``).
        local_slot_TK, num_slots: colocated experts: as ``AllToAllDispatcher.dispatch``. The one count exchange
            then carries counts per (chunk, rank, slot), and each chunk's expert call gets its [sources][L].
        shared_X, on_shared: numbers that ride along in the one count exchange (``comm.exchange_count_rows``).
        side: local work run while chunk 0's first exchange is in flight (``overlap.SideJob``; its ``output`` set).
    Returns:
        y_TH, equal to the unchunked dispatcher's result (values and gradients, up to float rounding).
    """
    t, k = dest_rank_TK.shape
    num_ranks, rank = group_size(group), group_rank(group)
    chunk_T = chunk_of_tokens(t, num_chunks, x_TH.device)
    if layout is None:
        slots = 1 if local_slot_TK is None else num_slots
        key_TK = slot_key(dest_rank_TK, local_slot_TK, slots)  # colocated: rows grouped by slot in every chunk
        order_A, send_CV = permute_by_destination(key_TK, keep_TK, num_ranks * slots, chunk_T, num_chunks)
        send_RCL = send_CV.view(num_chunks, num_ranks, slots).permute(1, 0, 2).contiguous()
        recv_RCL, tokens_R, sent_RCL, recv_dev_RCL = exchange_chunk_counts(send_RCL, t, group, x_TH.device,
                                                                           shared_X=shared_X, on_shared=on_shared)
        n = effective_chunks(num_chunks, tokens_R)
        send, recv = sent_RCL.sum(-1).t().tolist(), recv_RCL.sum(-1).t().tolist()  # host tensors: no sync
        programs, start = [], 0
        for c in range(n):
            ex = Exchange(("rows",), tuple(send[c]), tuple(recv[c]))
            args = () if local_slot_TK is None else (recv_RCL[:, c, :].tolist(), recv_dev_RCL[:, c, :])
            programs.append(ChunkProgram(start, start + sum(send[c]), (ex,), (ex.reverse(),), args))
            start += sum(send[c])
        order_A = order_A[:start]  # the rows sent; dropped assignments were sorted past them
        back_AH = run_pipeline(programs, {"rows": x_TH.index_select(0, order_A // k)}, expert, group, side)
        return sum_over_k(back_AH, order_A, topk_weights_TK.shape[0], topk_weights_TK.shape[1], topk_weights_TK)

    slots = None if local_slot_TK is None else num_slots
    pack = pack_by_node(dest_rank_TK, keep_TK, topk_weights_TK, layout, rank, chunk_T, num_chunks,
                        local_slot_TK=local_slot_TK, num_slots=num_slots)
    recv_RCW, tokens_R, sent_RCW, recv_dev_RCW = exchange_chunk_counts(pack.send_RCW, t, group, x_TH.device,
                                                                       shared_X=shared_X, on_shared=on_shared)
    n = effective_chunks(num_chunks, tokens_R)
    rows_C = stage1_rows_per_chunk(sent_RCW, n, slots or 1)
    g1 = node_groups.rail_group if node_groups is not None else None
    g2 = node_groups.node_group if node_groups is not None else None
    programs, start = [], 0
    for c, sp in enumerate(stage_splits(sent_RCW, recv_RCW, layout, rank, n, node_groups, num_slots=slots,
                                        recv_dev_RCW=recv_dev_RCW)):
        s1 = Exchange(("rows", "meta"), sp.s1_send, sp.s1_recv, g1)
        s2 = Exchange(("rows",), sp.s2_send, sp.s2_recv, g2)
        expand = Local(functools.partial(gateway_expand, num_copies=sum(sp.s2_send)), ("rows", "meta"),
                       ("rows", "weights", "order"))
        reduce = Local(lambda back, w, order: (gateway_reduce(back, w, order),), ("rows", "weights", "order"), ("rows",))
        args = () if slots is None else (sp.s2_recv_slots, sp.s2_recv_slots_dev)
        programs.append(ChunkProgram(start, start + rows_C[c], (s1, expand, s2), (s2.reverse(), reduce, s1.reverse(("rows",))),
                                     args))
        start += rows_C[c]
    token_S, node_S = pack.rows(start)
    meta_SK2 = stage1_meta(token_S, node_S, dest_rank_TK, keep_TK, topk_weights_TK, layout, local_slot_TK, num_slots)
    inputs = {"rows": x_TH.index_select(0, token_S), "meta": meta_SK2}
    partial_SH = run_pipeline(programs, inputs, expert, group, side)
    return source_reduce(partial_SH, token_S, node_S, t, layout.num_nodes)


class TokenExchange:
    """Steps 3-5 of ``LargeEPMoE.forward`` (dispatch, expert, combine), chosen by the dispatch config.

    Args:
        config: ``dispatch`` ("flat" | "hierarchical") and ``overlap_chunks`` (1 = no pipeline).
        ep_group: the EP process group.
        ranks_per_node: ranks per node, consecutive; required for "hierarchical" (at least two nodes).
        colocated: ranks hold several experts (calls pass ``local_slot_TK``); every path supports it.
        node_groups: "hierarchical" only (ValueError otherwise): run its stage 1 on the rail group and stage 2 on
            the node group (``process_groups.build_node_groups``); None runs both over ``ep_group``.

    ``dispatcher`` is the unchunked dispatcher (``AllToAllDispatcher`` or ``HierarchicalDispatcher``), with the
    dispatch/combine stage methods; with overlap_chunks > 1 the call goes through the overlap pipeline instead.
    """

    def __init__(self, config: DispatchConfig, ep_group: ProcessGroup | None, ranks_per_node: int | None = None,
                 colocated: bool = False, node_groups: NodeGroups | None = None):
        self.colocated = colocated
        self.num_chunks = config.overlap_chunks
        self.ep_group = ep_group
        self.layout: NodeLayout | None = None
        self.node_groups = node_groups
        self.dispatcher: AllToAllDispatcher | HierarchicalDispatcher
        if as_int(ranks_per_node) is not None:
            ranks_per_node = as_int(ranks_per_node)  # numpy.int64(8) as well as 8
        if node_groups is not None and config.dispatch != "hierarchical":
            raise ValueError(f"node_groups are used by dispatch='hierarchical' only, got dispatch={config.dispatch!r}")
        if config.dispatch == "hierarchical":
            if ranks_per_node is None:
                raise ValueError(
                    "dispatch='hierarchical' needs ranks_per_node (the ranks of one node, consecutive in the EP "
                    "group), got None"
                )
            self.dispatcher = HierarchicalDispatcher(ep_group, ranks_per_node, node_groups)
            self.layout = self.dispatcher.layout
        else:
            if ranks_per_node is not None and (isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, int) or ranks_per_node < 1):
                raise ValueError(f"ranks_per_node={ranks_per_node!r} must be an integer >= 1 or None")
            self.dispatcher = AllToAllDispatcher(ep_group)

    def __call__(self, x_TH: torch.Tensor, dest_rank_TK: torch.Tensor, keep_TK: torch.Tensor,
                 topk_weights_TK: torch.Tensor, expert: nn.Module, *, local_slot_TK: torch.Tensor | None = None,
                 num_slots: int = 1, shared_X: torch.Tensor | None = None,
                 on_shared: OnShared | None = None,
                 side: SideJob | None = None) -> torch.Tensor:
        """y_TH of the batch. Colocated (``local_slot_TK`` given, see ``AllToAllDispatcher.dispatch``): ``expert``
        is called as ``expert(rows_MH, recv_slot_counts, recv_slot_counts_dev)`` (``experts.LocalExperts``).
        ``shared_X`` / ``on_shared`` ride along in the one count exchange of every path
        (``comm.exchange_count_rows``).

        ``side`` (the shared expert) runs on every path while the first token all-to-all is in flight, after the
        count exchange: flat, the all-to-all of the rows; node-batched, stage 1 (the inter-node rows); chunked,
        chunk 0's first exchange, and in backward the first reverse exchange (it is part of the pipeline's
        autograd node). Unchunked, its backward is ordinary autograd (not overlapped). Its ``output`` is set."""
        if (local_slot_TK is not None) != self.colocated:
            raise ValueError(f"local_slot_TK must be given exactly when colocated={self.colocated}")
        shared = dict(shared_X=shared_X, on_shared=on_shared)
        if self.num_chunks > 1:
            return pipelined_exchange(x_TH, dest_rank_TK, keep_TK, topk_weights_TK, expert, group=self.ep_group,
                                      num_chunks=self.num_chunks, layout=self.layout, node_groups=self.node_groups,
                                      local_slot_TK=local_slot_TK, num_slots=num_slots, side=side, **shared)
        shared["during"] = None if side is None else side.run
        if self.colocated:
            rows_MH, handle = self.dispatcher.dispatch(x_TH, dest_rank_TK, keep_TK, topk_weights_TK,  # type: ignore[call-arg]
                                                       local_slot_TK=local_slot_TK, num_slots=num_slots, **shared)
            counts = (handle.recv_slot_counts, handle.recv_slot_counts_dev)
            return self.dispatcher.combine(expert(rows_MH, *counts), handle)  # type: ignore[arg-type]
        rows_MH, handle = self.dispatcher.dispatch(x_TH, dest_rank_TK, keep_TK, topk_weights_TK, **shared)
        return self.dispatcher.combine(expert(rows_MH), handle)  # type: ignore[arg-type]
