"""Node-batched (hierarchical) dispatch: a token crosses the inter-node link once per remote node it needs.

Shape legend:
    T  tokens of this rank      K  top_k        H  hidden size       R  ranks in the EP group
    G  ranks per node           N  nodes        C  chunks (1 without the overlap pipeline)    W  counts per chunk
    S  stage-1 rows this rank sends: one per (token, node that holds at least one of its kept experts)
    U  stage-1 rows this rank receives as a gateway
    B  assignments this gateway forwards inside its node (one per received row and expert of it on this node)
    M  rows this rank's expert receives

Ranks are numbered node by node: EP rank r lives on node r // G with local index r % G (torchrun's order).

Dispatch of a token on rank s (node a, local index l):
    stage 1, across nodes: for every node n that holds one of the token's kept experts, ONE row goes to rank
        n*G + l, the *gateway* of s on node n (same local index: on a real cluster, the same NIC rail). The row
        carries metadata [K weights | K local destinations] (weight 0 and destination -1 for experts elsewhere).
    stage 2, inside node n: the gateway copies the row once per expert of the token on its node and sends each
        copy to the rank that holds that expert.
Combine undoes it: expert outputs go back to the gateway (stage 2 reversed), the gateway takes the weighted sum over
the token's experts on its node, ONE row per (token, node) goes back (stage 1 reversed), and the source sums over
nodes. So both directions cross nodes once per (token, remote node) instead of once per (token, remote expert):
the inter-node rows shrink by the dedup factor (``internode_rows``). Results equal the flat dispatcher up to the
order of a float32 sum (per node, then over nodes).

By default both stages are ``all_to_all_single`` over the EP group with zero splits outside the stage (the rail,
the node), so no extra process group is needed. Given ``NodeGroups`` (``process_groups.build_node_groups``), stage
1 runs on the rail group and stage 2 on the node group: a collective over G (or N) ranks instead of R, which on
gloo and NCCL alike does not touch the peers it has nothing for. The split sizes are computed in EP-group order
and converted to the subgroup's order (``to_subgroup``). All counts of both stages and all chunks come from ONE small exchange up front:
rank s tells rank r, per chunk, [its flat count to r, its stage-1 rows to r, its flat counts to each rank of r's
node]; from that r knows what it receives in stage 1, what it forwards in stage 2 (as a gateway) and what it
receives in stage 2 (as an expert). The counts are built on the tokens' device and read on the host once, by
that exchange (``exchange_chunk_counts`` returns the sent counts from the same sync).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from .comm import OnShared, ProcessGroup, all_to_all, all_to_all_lanes, exchange_chunk_counts, group_rank, group_size
from .dispatcher import slot_key, sum_over_k
from .process_groups import NodeGroups


@dataclass(frozen=True, kw_only=True)
class NodeLayout:
    """Which node each EP rank is on: ``ranks_per_node`` consecutive ranks per node, at least two nodes."""

    num_ranks: int
    ranks_per_node: int

    def __post_init__(self) -> None:
        g, r = self.ranks_per_node, self.num_ranks
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(f"ranks_per_node={g!r} must be an integer >= 1")
        if r % g:
            raise ValueError(f"ranks_per_node={g} does not divide the EP group size {r}")
        if r // g < 2:
            raise ValueError(
                f"dispatch='hierarchical' needs at least two nodes, but ranks_per_node={g} and the EP group has {r} "
                "rank(s): one node. Use dispatch='flat'."
            )

    @property
    def num_nodes(self) -> int:
        return self.num_ranks // self.ranks_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def local_of(self, rank: int) -> int:
        return rank % self.ranks_per_node


@dataclass(frozen=True)
class NodePack:
    """Stage-1 rows of this rank, chunk-major (then node, then token), and the counts it tells the others.

    Built on the device without a host sync: the number of stage-1 rows S is known on the host only after the
    count exchange, so every (token, node) pair is sorted, the S real rows first; ``rows(S)`` then cuts them.

    Attributes:
        pair_P: int64 [T*N] indices of the (token, node) pairs (token * N + node), the S rows first.
        send_RCW: int64 [R, C, L + 1 + G*L] counts to exchange (see ``pack_by_node``), on the tokens' device.
    """

    pair_P: torch.Tensor
    send_RCW: torch.Tensor
    num_nodes: int

    def rows(self, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """token_S, node_S: int64 token and destination node of each of the ``num_rows`` stage-1 rows."""
        pair_S = self.pair_P[:num_rows]
        return pair_S // self.num_nodes, pair_S % self.num_nodes


@dataclass(frozen=True)
class StageSplits:
    """Split sizes of one chunk's two stages, seen from this rank, dispatch direction: length R each over the EP
    group, or over the rail group (stage 1) and the node group (stage 2) when node groups are used.
    ``s2_recv_slots``: colocated experts only: rows received in stage 2 from each source (in arrival order), per
    local expert slot (what ``experts.LocalExperts`` takes); None otherwise. ``s2_recv_slots_dev``: the same on
    the device, when the exchanged counts were given there."""

    s1_send: tuple[int, ...]
    s1_recv: tuple[int, ...]
    s2_send: tuple[int, ...]
    s2_recv: tuple[int, ...]
    s2_recv_slots: tuple[tuple[int, ...], ...] | None = None
    s2_recv_slots_dev: torch.Tensor | None = None


def pack_by_node(
    dest_rank_TK: torch.Tensor,
    keep_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    layout: NodeLayout,
    rank: int,
    chunk_T: torch.Tensor,
    num_chunks: int,
    local_slot_TK: torch.Tensor | None = None,
    num_slots: int = 1,
) -> NodePack:
    """Step 1 of a hierarchical dispatch, local: one row per (token, node) and the counts to exchange.

    Counts told to rank r, per chunk (L = ``num_slots`` with colocated experts, else 1):
    [flat count to r per slot (L) | stage-1 rows to r | flat counts to every rank of r's node, per slot (G*L)].
    With colocated experts (``local_slot_TK``: the slot of each assignment's expert on its destination rank) the
    gateway forwards copies sorted by (local rank, slot), so each expert rank receives every gateway's block
    grouped by slot, as the flat colocated dispatch delivers them.
    """
    t, k = dest_rank_TK.shape
    g, n, r = layout.ranks_per_node, layout.num_nodes, layout.num_ranks
    slots = 1 if local_slot_TK is None else num_slots
    device = dest_rank_TK.device
    node_TK = dest_rank_TK // g
    # Which nodes each token needs (dropped assignments need none): a scatter into N + 1 columns, the last one
    # taking the dropped assignments.
    present_TN = torch.zeros(t, n + 1, dtype=torch.int64, device=device)
    present_TN.scatter_(1, torch.where(keep_TK, node_TK, n), 1)
    present_TN = present_TN[:, :n]
    # Chunk-major, then node (= gateway), then token: each (chunk, gateway) block is contiguous for the all-to-all.
    # Pairs a token does not need get a key past every chunk, so they sort last.
    key_TN = chunk_T.unsqueeze(1) * n + torch.arange(n, device=device)
    key_P = torch.where(present_TN.bool(), key_TN, num_chunks * n).reshape(-1)
    pair_P = torch.sort(key_P, stable=True).indices

    # Counts, by scatter-add on the device: the count exchange reads them on the host in its one sync.
    flat_key_TK = slot_key(chunk_T.unsqueeze(1) * r + dest_rank_TK, local_slot_TK, slots)
    flat_key = torch.where(keep_TK, flat_key_TK, num_chunks * r * slots).reshape(-1)
    flat_CRL = torch.zeros(num_chunks * r * slots + 1, dtype=torch.int64, device=device).scatter_add_(
        0, flat_key, torch.ones_like(flat_key))[:-1].view(num_chunks, r, slots)
    rows_CN = torch.zeros(num_chunks, n, dtype=torch.int64, device=device).index_add_(0, chunk_T, present_TN)
    gateways = torch.arange(n, device=device) * g + layout.local_of(rank)
    send_RCW = torch.zeros(r, num_chunks, slots + 1 + g * slots, dtype=torch.int64, device=device)
    send_RCW[:, :, :slots] = flat_CRL.permute(1, 0, 2)
    send_RCW[gateways, :, slots] = rows_CN.t()
    node_of_R = torch.arange(r, device=device) // g
    send_RCW[:, :, slots + 1:] = flat_CRL.reshape(num_chunks, n, g * slots)[:, node_of_R, :].permute(1, 0, 2)
    return NodePack(pair_P, send_RCW, n)


def stage1_meta(token_S: torch.Tensor, node_S: torch.Tensor, dest_rank_TK: torch.Tensor, keep_TK: torch.Tensor,
                topk_weights_TK: torch.Tensor, layout: NodeLayout, local_slot_TK: torch.Tensor | None = None,
                num_slots: int = 1) -> torch.Tensor:
    """meta_SK2 of the stage-1 rows, float32 [weights (0 for experts elsewhere) | local destination (-1 for none)];
    the local destination is the node-local rank, or with colocated experts ``local rank * L + slot``;
    differentiable in the weights."""
    g = layout.ranks_per_node
    slots = 1 if local_slot_TK is None else num_slots
    on_node_SK = (dest_rank_TK.index_select(0, token_S) // g == node_S.unsqueeze(1)) & keep_TK.index_select(0, token_S)
    weights_SK = topk_weights_TK.index_select(0, token_S) * on_node_SK
    vlocal_SK = slot_key(dest_rank_TK % g, local_slot_TK, slots).index_select(0, token_S)
    local_SK = torch.where(on_node_SK, vlocal_SK, torch.full_like(vlocal_SK, -1))
    return torch.cat([weights_SK.float(), local_SK.float()], dim=1)


def stage1_rows_per_chunk(sent_RCW: torch.Tensor, num_chunks: int, num_slots: int = 1) -> list[int]:
    """Stage-1 rows this rank sends per chunk, from the host copy of ``NodePack.send_RCW``."""
    return sent_RCW[:, :num_chunks, num_slots].sum(dim=0).tolist()  # a host tensor: no sync


def to_subgroup(splits_R: Sequence[int], members: Sequence[int], what: str) -> tuple[int, ...]:
    """Split sizes over the EP group -> over a subgroup whose rank i is EP rank ``members[i]``.

    The splits to ranks outside the subgroup are zero by construction (stage 1 talks to the rail, stage 2 to the
    node); a non-zero one means the groups do not match the layout, and is refused rather than dropped.
    """
    inside = set(members)
    outside = {r: n for r, n in enumerate(splits_R) if n and r not in inside}
    if outside:
        raise ValueError(
            f"{what}: non-zero split sizes {outside} to EP ranks outside the subgroup {tuple(members)}; the node "
            "groups do not match ranks_per_node / the EP group (build them with build_node_groups)"
        )
    return tuple(splits_R[m] for m in members)


def stage_splits(sent_RCW: torch.Tensor, recv_RCW: torch.Tensor, layout: NodeLayout, rank: int, num_chunks: int,
                 node_groups: NodeGroups | None = None, num_slots: int | None = None,
                 recv_dev_RCW: torch.Tensor | None = None) -> list[StageSplits]:
    """Step 2, local: the split sizes of both stages of every chunk, from the exchanged counts (host tensors).

    Without ``node_groups`` the splits are over the EP group (length R); with them, stage 1's over the rail group
    and stage 2's over the node group. ``num_slots``: L of ``pack_by_node`` with colocated experts; the splits then
    also carry ``s2_recv_slots`` (and ``s2_recv_slots_dev`` from ``recv_dev_RCW``, the exchanged counts on the
    device: slices only, no host-to-device copy).
    """
    g, r = layout.ranks_per_node, layout.num_ranks
    slots = 1 if num_slots is None else num_slots
    node, local = layout.node_of(rank), layout.local_of(rank)
    mates = list(range(node * g, (node + 1) * g))
    rail = [s for s in range(r) if s % g == local]
    rails = [[s for s in range(r) if s % g == j] for j in range(g)]
    out = []
    for c in range(num_chunks):
        s2_send, s2_recv = [0] * r, [0] * r
        # Rows this rank's experts receive from each node-mate gateway m, per slot: the flat counts of m's rail.
        from_mate = [recv_RCW[rails[j], c, :slots].sum(dim=0).tolist() for j in range(g)]
        for j, m in enumerate(mates):
            s2_send[m] = int(recv_RCW[rail, c, slots + 1 + j * slots: slots + 1 + (j + 1) * slots].sum())
            s2_recv[m] = sum(from_mate[j])  # what gateway m sends me
        recv_slots, recv_slots_dev = None, None
        if num_slots is not None:
            # Per stage-2 source in the order its rows arrive (the collective's group order); zeros off the node.
            members = node_groups.node_members if node_groups is not None else range(r)
            recv_slots = tuple(tuple(from_mate[mates.index(m)]) if m in mates else (0,) * slots for m in members)
            if recv_dev_RCW is not None:
                # Rail j is EP ranks j, j + G, ...: a strided slice of the device counts.
                mates_dev = torch.stack([recv_dev_RCW[j::g, c, :slots].sum(dim=0) for j in range(g)])
                if node_groups is not None:  # the node group's members are this node's ranks, in order
                    recv_slots_dev = mates_dev
                else:
                    recv_slots_dev = recv_dev_RCW.new_zeros((r, slots))
                    recv_slots_dev[node * g:(node + 1) * g] = mates_dev
        sp = StageSplits(s1_send=tuple(sent_RCW[:, c, slots].tolist()), s1_recv=tuple(recv_RCW[:, c, slots].tolist()),
                         s2_send=tuple(s2_send), s2_recv=tuple(s2_recv), s2_recv_slots=recv_slots,
                         s2_recv_slots_dev=recv_slots_dev)
        if node_groups is not None:
            rail_m, node_m = node_groups.rail_members, node_groups.node_members
            sp = StageSplits(s1_send=to_subgroup(sp.s1_send, rail_m, "stage 1 send"),
                             s1_recv=to_subgroup(sp.s1_recv, rail_m, "stage 1 receive"),
                             s2_send=to_subgroup(sp.s2_send, node_m, "stage 2 send"),
                             s2_recv=to_subgroup(sp.s2_recv, node_m, "stage 2 receive"),
                             s2_recv_slots=recv_slots, s2_recv_slots_dev=recv_slots_dev)
        out.append(sp)
    return out


def gateway_expand(rows_UH: torch.Tensor, meta_UK2: torch.Tensor, num_copies: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 1 -> stage 2 at the gateway, local: one copy of a received row per expert of it on this node.
    ``num_copies``: B, from the host's stage-2 splits (so the device never has to report it).

    Returns:
        rows_BH: copies ordered by local destination rank (stable, so each source's rows keep their order).
        weights_UK: the combine weights of the received rows (differentiable; 0 for experts elsewhere).
        order_B: int64 indices into the flattened [U*K] (row, slot) pairs, the order of ``rows_BH``.
    """
    k = meta_UK2.shape[1] // 2
    weights_UK, local_UK = meta_UK2[:, :k], meta_UK2[:, k:].long()
    flat_local = local_UK.reshape(-1)
    # (row, slot) pairs with no expert here (-1) get a key past every destination, so they sort last.
    key = torch.where(flat_local >= 0, flat_local, flat_local.new_full((), torch.iinfo(torch.int64).max))
    order_B = torch.sort(key, stable=True).indices[:num_copies]
    return rows_UH.index_select(0, order_B // k), weights_UK, order_B


def gateway_reduce(back_BH: torch.Tensor, weights_UK: torch.Tensor, order_B: torch.Tensor) -> torch.Tensor:
    """Stage 2 -> stage 1 at the gateway, local: the weighted sum over a row's experts on this node, [U, H]."""
    return sum_over_k(back_BH, order_B, weights_UK.shape[0], weights_UK.shape[1], weights_UK)


def source_reduce(partial_SH: torch.Tensor, token_S: torch.Tensor, node_S: torch.Tensor, num_tokens: int, num_nodes: int) -> torch.Tensor:
    """The last step, local: y_TH = the sum over nodes of the partial sums that came back (float32 sum)."""
    full = partial_SH.new_zeros((num_tokens * num_nodes, partial_SH.shape[-1]))
    full = full.index_copy(0, token_S * num_nodes + node_S, partial_SH)
    # An explicit width (not -1): with T = 0 a -1 cannot be inferred.
    return full.view(num_tokens, num_nodes, partial_SH.shape[-1]).float().sum(dim=1).to(partial_SH.dtype)


def internode_rows(dest_rank_TK: torch.Tensor, keep_TK: torch.Tensor, rank: int, layout: NodeLayout) -> tuple[int, int]:
    """Rows this rank sends across nodes in one dispatch: (flat, hierarchical). flat / hierarchical is the dedup
    factor; combine sends the same numbers back."""
    node_TK = dest_rank_TK // layout.ranks_per_node
    remote_TK = keep_TK & (node_TK != layout.node_of(rank))
    flat = int(remote_TK.sum())
    present = torch.zeros(dest_rank_TK.shape[0], layout.num_nodes, dtype=torch.bool, device=dest_rank_TK.device)
    t_idx = torch.arange(dest_rank_TK.shape[0], device=dest_rank_TK.device).unsqueeze(1).expand_as(node_TK)
    present[t_idx[remote_TK], node_TK[remote_TK]] = True
    return flat, int(present.sum())


def check_node_groups(node_groups: NodeGroups, ep_group: ProcessGroup | None, ranks_per_node: int) -> None:
    """ValueError unless ``node_groups`` were built for ``ep_group`` with ``ranks_per_node`` (no collective)."""
    if not isinstance(node_groups, NodeGroups):
        raise ValueError(f"node_groups={node_groups!r} must be a NodeGroups from build_node_groups, or None")
    if node_groups.ranks_per_node != ranks_per_node:
        raise ValueError(f"node_groups were built with ranks_per_node={node_groups.ranks_per_node}, "
                         f"the dispatch uses ranks_per_node={ranks_per_node}")
    ep_ranks = tuple(dist.get_process_group_ranks(ep_group if ep_group is not None else dist.group.WORLD))
    if node_groups.ep_ranks != ep_ranks:
        raise ValueError(f"node_groups were built for the EP group {node_groups.ep_ranks}, "
                         f"the dispatch runs on {ep_ranks}")


@dataclass(frozen=True)
class HierarchicalHandle:
    """What ``HierarchicalDispatcher.combine`` needs to undo a dispatch.

    Attributes:
        splits: both stages' split sizes.
        weights_UK: gateway-side combine weights (differentiable).
        order_B: int64 gateway-side (row, slot) order of the forwarded copies.
        token_S, node_S: int64 token and node of each stage-1 row this rank sent.
        num_tokens: T.  num_nodes: N.
        recv_slot_counts: colocated experts: rows received per stage-2 source and local slot; None otherwise.
        recv_slot_counts_dev: the same on the device.
    """

    splits: StageSplits
    weights_UK: torch.Tensor
    order_B: torch.Tensor
    token_S: torch.Tensor
    node_S: torch.Tensor
    num_tokens: int
    num_nodes: int
    recv_slot_counts: tuple[tuple[int, ...], ...] | None = None
    recv_slot_counts_dev: torch.Tensor | None = None


class HierarchicalDispatcher:
    """Node-batched dispatcher with the same contract as ``AllToAllDispatcher``: dispatch -> (rows, frozen
    handle), combine(rows, handle) -> y_TH; no per-call state on self.

    Args:
        ep_group: the expert-parallel process group (None = default group).
        ranks_per_node: G; EP rank r is on node r // G. At least two nodes (else ValueError).
        node_groups: this rank's node and rail groups (``process_groups.build_node_groups``) to run stage 2 on the
            node group and stage 1 on the rail group; None runs both over the EP group.

    Attributes:
        stage1_group, stage2_group: the groups the two stages run on.
    """

    def __init__(self, ep_group: ProcessGroup | None, ranks_per_node: int, node_groups: NodeGroups | None = None):
        self.ep_group = ep_group
        self.num_ranks = group_size(ep_group)
        self.rank = group_rank(ep_group)
        self.layout = NodeLayout(num_ranks=self.num_ranks, ranks_per_node=ranks_per_node)
        self.node_groups = node_groups
        self.stage1_group, self.stage2_group = ep_group, ep_group
        if node_groups is not None:
            check_node_groups(node_groups, ep_group, ranks_per_node)
            self.stage1_group, self.stage2_group = node_groups.rail_group, node_groups.node_group

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
    ) -> tuple[torch.Tensor, HierarchicalHandle]:
        """Send each token once to every node that holds one of its kept experts, then to those experts.

        Args and returns as ``AllToAllDispatcher.dispatch`` (``shared_X`` / ``on_shared`` ride along in the one
        count exchange, over the whole EP group; colocated experts: ``local_slot_TK`` / ``num_slots``, and the
        handle's ``recv_slot_counts``); rows_MH is grouped by gateway rank (then by slot). ``during`` runs while
        stage 1 (the inter-node rows) is in flight.
        """
        chunk_T = torch.zeros(x_TH.shape[0], dtype=torch.int64, device=x_TH.device)
        pack = pack_by_node(dest_rank_TK, keep_TK, topk_weights_TK, self.layout, self.rank, chunk_T, 1,
                            local_slot_TK=local_slot_TK, num_slots=num_slots)
        recv_RCW, _, sent_RCW, recv_dev_RCW = exchange_chunk_counts(
            pack.send_RCW, x_TH.shape[0], self.ep_group, x_TH.device, shared_X=shared_X, on_shared=on_shared)
        splits = stage_splits(sent_RCW, recv_RCW, self.layout, self.rank, 1, self.node_groups,
                              num_slots=None if local_slot_TK is None else num_slots, recv_dev_RCW=recv_dev_RCW)[0]
        token_S, node_S = pack.rows(sum(splits.s1_send))
        meta_SK2 = stage1_meta(token_S, node_S, dest_rank_TK, keep_TK, topk_weights_TK, self.layout, local_slot_TK,
                               num_slots)
        rows_SH = x_TH.index_select(0, token_S)
        rows_UH, meta_UK2 = all_to_all_lanes([rows_SH, meta_SK2], splits.s1_recv, splits.s1_send, self.stage1_group,
                                             during=during)
        rows_BH, weights_UK, order_B = gateway_expand(rows_UH, meta_UK2, sum(splits.s2_send))
        rows_MH = all_to_all(rows_BH, splits.s2_recv, splits.s2_send, self.stage2_group)
        handle = HierarchicalHandle(
            splits=splits, weights_UK=weights_UK, order_B=order_B, token_S=token_S, node_S=node_S,
            num_tokens=x_TH.shape[0], num_nodes=self.layout.num_nodes, recv_slot_counts=splits.s2_recv_slots,
            recv_slot_counts_dev=splits.s2_recv_slots_dev,
        )
        return rows_MH, handle

    def combine(self, rows_MH: torch.Tensor, handle: HierarchicalHandle) -> torch.Tensor:
        """Send expert outputs back through their gateways (summed per node there) and sum them per token."""
        s = handle.splits
        back_BH = all_to_all(rows_MH, s.s2_send, s.s2_recv, self.stage2_group)
        partial_UH = gateway_reduce(back_BH, handle.weights_UK, handle.order_B)
        partial_SH = all_to_all(partial_UH, s.s1_send, s.s1_recv, self.stage1_group)
        return source_reduce(partial_SH, handle.token_S, handle.node_S, handle.num_tokens, handle.num_nodes)
