"""Live re-placement: home experts move between ranks, with their whole training state, at a step boundary.

Shape legend:
    E experts      R ranks of the EP group      N nodes of the EP group      T tokens      K top_k
    B bytes of one expert's packed state (weights, gradient, optimizer state)

With ``LargeEPConfig(replace_every=N)`` a layer counts, in every training forward, which experts its tokens chose
together (the co-activation, [E, E], on the device: a one-hot matmul, no sync) and how many token rows it sent
to each node (node-batched crossings, what the links carry). Every N calls of ``largeep_plugin.rebalance(model,
optimizer)`` the counts of the EP group (and of its data-parallel copies, so every copy plans the same) are
summed in one all_reduce and read once; the pure planner (``placement/moves.py``) looks for a layout of the same
home slots whose busiest inter-node link, replayed on that window, is lighter by more than ``replace_margin``
and pays for the bytes within the next N steps. When it does, the experts move:

    1. every rank packs the state of each home slot that leaves (``expert_state.pack``: weights, gradient,
       optimizer state; read through the route's ``StateAccess``, e.g. a torch optimizer's ``state[param]``);
    2. one all-to-all over the EP group (``comm.exchange_rows``, uneven splits, no new process group) takes each
       to the slot that will hold it;
    3. each slot writes what it received into its own parameter tensors and optimizer state; the layer relabels
       which expert each slot holds (``LargeEPMoE.relabel_homes``: routing, slot table, clone plan).

The parameter tensors never change identity: the optimizer, DDP, ZeRO and the expert-data-parallel groups see the
same tensors, now holding another expert's numbers. The selection bias, the load history and the clones' load
average are indexed by global expert id and replicated over the EP group, so they need no move. Training after a
move is the same math as before it (``tests/test_moves.py``: losses and parameters equal a run that never moved).
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from largeep_plugin.placement.moves import MovePlan, check_movable, layout_figures, plan_moves
from largeep_plugin.placement.topology import Topology

from .clones import refresh_clones
from .comm import ProcessGroup, exchange_rows, group_size
from .expert_state import Layout, StateAccess, access_of, layout_of, pack, unpack


class HomeMoves(nn.Module):
    """The move bookkeeping of one rank of a ``LargeEPMoE`` layer with ``replace_every`` > 0.

    Args:
        config: the layer's config (``replace_every``, ``replace_margin``, ``num_experts``, ``top_k``).
        ep_group, ep_rank: the layer's EP group and this rank's index in it.
        topology: the EP group's ranks as nodes.
    Buffers (not saved: a window that a checkpoint cuts short starts again):
        coact_EE float64 [E, E]: tokens that chose both experts (diagonal: the load), since the last decision.
        sent_N float64 [N]: token rows this rank sent to each node (once per token and node), since then.
    Attributes:
        steps: calls of ``end_step`` so far; records: every decision's record (``replace_layers``).
    """

    def __init__(self, config: Any, *, ep_group: ProcessGroup | None, ep_rank: int, topology: Topology):
        super().__init__()
        e, n = config.num_experts, topology.num_nodes
        self.config, self.ep_group, self.ep_rank, self.topology = config, ep_group, ep_rank, topology
        self.register_buffer("coact_EE", torch.zeros(e, e, dtype=torch.float64), persistent=False)
        self.register_buffer("sent_N", torch.zeros(n, dtype=torch.float64), persistent=False)
        self.register_buffer("node_R", torch.tensor(topology.node_of_rank(), dtype=torch.long), persistent=False)
        self.steps = 0
        self.last_record: dict[str, Any] | None = None
        self._live_since: tuple[tuple[int, ...], ...] | None = None   # the layout the window ran on

    @torch.no_grad()
    def observe(self, topk_ids_TK: torch.Tensor, keep_TK: torch.Tensor, dest_rank_TK: torch.Tensor) -> None:
        """Count one training forward (device work only): co-activation of the kept assignments, and the nodes
        each token was sent to (a node counted once per token, as node-batched dispatch sends it)."""
        e, n = self.config.num_experts, self.topology.num_nodes
        t = topk_ids_TK.shape[0]
        chosen_TE = torch.zeros(t, e, dtype=torch.float32, device=topk_ids_TK.device)
        chosen_TE.scatter_(1, topk_ids_TK, keep_TK.to(torch.float32))
        self.coact_EE += (chosen_TE.T @ chosen_TE).to(torch.float64)
        nodes_TK = self.node_R[dest_rank_TK]
        reach_TN = torch.zeros(t, n + 1, dtype=torch.float32, device=topk_ids_TK.device)
        reach_TN.scatter_(1, torch.where(keep_TK, nodes_TK, n), 1.0)
        self.sent_N += reach_TN[:, :n].sum(0).to(torch.float64)

    def due(self) -> bool:
        """Count one step; whether this one decides (every ``replace_every`` steps)."""
        self.steps += 1
        return self.steps % self.config.replace_every == 0

    def window(self, dp_group: ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(coact_EE, link tokens [N, N] measured) of the window, summed over the EP group and ``dp_group`` (one
        all_reduce each; read once), then reset."""
        e, n = self.config.num_experts, self.topology.num_nodes
        me = self.topology.node_of_rank()[self.ep_rank]  # from the host's topology, not the device's node_R
        links_NN = torch.zeros(n, n, dtype=torch.float64, device=self.sent_N.device)
        links_NN[me] = self.sent_N
        links_NN[me, me] = 0.0
        flat = torch.cat([self.coact_EE.reshape(-1), links_NN.reshape(-1)])
        _all_reduce(flat, self.ep_group, dp_group, dist.ReduceOp.SUM if _distributed() else None)
        host = flat.cpu()
        self.coact_EE.zero_()
        self.sent_N.zero_()
        return host[:e * e].view(e, e), host[e * e:].view(n, n)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(t: torch.Tensor, ep_group: ProcessGroup | None, dp_group: ProcessGroup | None, op: Any) -> None:
    """Reduce ``t`` over the EP group, then over ``dp_group`` when it holds more than this rank."""
    if not _distributed():
        return
    if group_size(ep_group) > 1:
        dist.all_reduce(t, op=op, group=ep_group)
    if dp_group is not None and group_size(dp_group) > 1:
        dist.all_reduce(t, op=op, group=dp_group)


def move_layers(model: Any) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every layer of ``model`` (a module or a list of chunks) that can move its home experts:
    the modules with ``relabel_homes`` (``LargeEPMoE``), in model order."""
    out = []
    for chunk in model if isinstance(model, (list, tuple)) else [model]:
        for name, module in chunk.named_modules():
            if callable(getattr(module, "relabel_homes", None)):
                out.append((name, module))
    return out


def replace_layers(layers: Sequence[tuple[str, nn.Module]], optimizer: Any,
                   dp_group: ProcessGroup | None = None) -> list[dict[str, Any]]:
    """After an optimizer step: every layer with ``replace_every`` counts the step and, when due, plans from its
    window and moves its home experts if that is worth it (module docstring). ``optimizer``: the torch optimizer
    (or the route's ``StateAccess``) whose state moves with the experts. Collective over each EP group (and
    ``dp_group``, the ranks holding this EP rank in every data-parallel copy). Returns the decisions' records."""
    records = []
    access = None
    for name, layer in layers:
        moves = getattr(layer, "moves", None)
        if moves is None or not moves.due():
            continue
        if optimizer is None:
            raise ValueError(f"{name}: replace_every={moves.config.replace_every} moves experts with their optimizer "
                             "state: call largeep_plugin.rebalance(model, optimizer) (the optimizer that steps the "
                             "model)")
        _check_copies(name, layer, dp_group)
        access = access or access_of(optimizer)
        records.append({"layer": name, **decide(layer, access, dp_group)})
    return records


def _check_copies(name: str, layer: nn.Module, dp_group: ProcessGroup | None) -> None:
    """With data-parallel copies of the EP group every copy must move the same way (the expert-data-parallel groups
    follow the slots): the counts are summed over ``dp_group`` first, which must then be given."""
    if dp_group is not None:
        return
    for _, module in layer.local_experts():
        for p in module.parameters():
            # The core tags the parameters; Megatron's layer names its expert-data-parallel group itself.
            group = getattr(p, "expert_dp_group", None) or getattr(layer, "expert_dp_group", None)
            if group is not None and group_size(group) > 1:
                raise ValueError(f"{name}: replace_every with data-parallel copies of the EP group needs "
                                 "rebalance(model, optimizer, dp_group=...) (the ranks holding this EP rank in every "
                                 "copy, largeep_plugin.hf.parallel_groups(...).dp_group; Megatron: the layer's "
                                 "expert_dp_group), so every copy moves alike")
            return


def decide(layer: nn.Module, access: StateAccess, dp_group: ProcessGroup | None) -> dict[str, Any]:
    """One decision of ``layer`` (its window summed, planned, moved when worth it); the record."""
    moves: HomeMoves = layer.moves
    cfg = moves.config
    coact_EE, measured_NN = moves.window(dp_group)
    home = layer.home_layout()
    homes = [m for _, m in layer.local_experts()]
    layout = layout_of([access.read(p, grad=True) for p in homes[0].parameters()])
    _check_layouts(layer, layout, dp_group)
    element = next(homes[0].parameters()).element_size()
    record: dict[str, Any] = {"step": moves.steps, "moved": [], "bytes": 0, "seconds": 0.0,
                              "measured_link_tokens": measured_NN.tolist(),
                              "measured_max_link_tokens": float(measured_NN.max())}
    load_E = torch.diagonal(coact_EE).clone()
    if float(load_E.sum()) <= 0:
        record["skipped"] = "no training forward in the window"
        moves.last_record = record
        return record
    plan = plan_moves(home, moves.topology, load_E, coact_EE, top_k=cfg.top_k,
                      row_bytes=float(cfg.hidden_size * element), expert_bytes=float(layout.num_bytes),
                      margin=cfg.replace_margin, window_steps=cfg.replace_every, horizon_steps=cfg.replace_every)
    record.update(_plan_record(plan))
    if plan.moves:
        start = time.perf_counter()
        record["bytes_sent_here"] = move_experts(layer, plan.home, access, layout=layout, refresh=False)
        record["seconds"] = time.perf_counter() - start
        record["bytes"] = plan.move_bytes
        record["moved"] = [{"expert": x, "from": a, "to": b} for x, a, b in plan.moves]
    moves.last_record = record
    return record


def _plan_record(plan: MovePlan) -> dict[str, Any]:
    return {"worth": plan.worth, "predicted_link_seconds_before": plan.link_seconds_before,
            "predicted_link_seconds_after": plan.link_seconds_after, "predicted_gain": plan.gain,
            "predicted_max_link_tokens_before": max(max(r) for r in plan.link_tokens_before),
            "predicted_max_link_tokens_after": max(max(r) for r in plan.link_tokens_after),
            "move_seconds_predicted": plan.move_seconds, "candidate_moves": [list(m) for m in plan.candidate_moves],
            "home": [list(h) for h in plan.home]}


def _check_layouts(layer: nn.Module, layout: Layout, dp_group: ProcessGroup | None) -> None:
    """Every rank packs its experts the same way (same optimizer state, gradients present or not everywhere),
    checked with one tiny all_reduce (MAX of the values and of their negatives)."""
    if not _distributed():
        return
    mine = [layout.signature(), layout.num_bytes]
    check = torch.tensor(mine + [-v for v in mine], dtype=torch.int64)
    check = check.to(next(layer.parameters()).device)
    _all_reduce(check, layer.ep_group, dp_group, dist.ReduceOp.MAX)
    got = check.tolist()
    if got[0] != -got[2] or got[1] != -got[3]:
        raise ValueError(f"{type(layer).__name__}: the ranks keep different training state for their experts "
                         f"(this rank: {layout.num_bytes} bytes per expert, fields "
                         f"{[(f.name, f.kind) for f in layout.fields[:6]]}...): every rank must have stepped the "
                         "same optimizer, and have gradients or none alike, before experts move")


@torch.no_grad()
def move_experts(layer: nn.Module, home: Sequence[Sequence[int]], access: StateAccess | Any,
                 layout: Layout | None = None, refresh: bool = True) -> int:
    """Move ``layer``'s home experts to the layout ``home`` ([R] the experts of each EP rank: the same number per
    rank as today, each expert once), with their whole state (``access``: the route's ``StateAccess`` or a torch
    optimizer); relabel the layer and, with ``refresh`` and dynamic replicas, refresh its clones from the moved
    homes (``rebalance`` refreshes them itself right after). Collective over the EP group: every rank calls it
    with the same ``home``. Returns the bytes this rank sent (its own slots included)."""
    access = access_of(access)
    old = layer.home_layout()
    new = check_movable(home, len({x for held in old for x in held}))  # E (the layer holds every expert)
    if [len(h) for h in new] != [len(h) for h in old]:
        raise ValueError(f"home={[list(h) for h in new]}: a move keeps the number of home experts of every rank "
                         f"({[len(h) for h in old]})")
    where = {x: (r, l) for r, held in enumerate(old) for l, x in enumerate(held)}
    me = layer.ep_rank
    homes = [m for _, m in layer.local_experts()]
    # Transfers (source rank, source slot, destination rank, destination slot) of the slots whose expert changes.
    transfers = [(*where[x], r, l) for r, held in enumerate(new) for l, x in enumerate(held) if where[x] != (r, l)]
    if not transfers:
        return 0
    params = [list(m.parameters()) for m in homes]
    if layout is None:
        layout = layout_of([access.read(p, grad=True) for p in params[0]])
    size = layout.num_bytes
    device = params[0][0].device
    # step 1: pack what leaves, by destination (rank, slot); reads first, since a slot may also receive
    sends = sorted((r, l, sl) for sr, sl, r, l in transfers if sr == me)
    buffers = [pack([access.read(p, grad=True) for p in params[sl]], layout, device) for _, _, sl in sends]
    send_splits = [0] * layer.ep_size
    for r, _, _ in sends:
        send_splits[r] += size
    takes = sorted((sr, l) for sr, _, r, l in transfers if r == me)
    recv_splits = [0] * layer.ep_size
    for sr, _ in takes:
        recv_splits[sr] += size
    flat = torch.cat(buffers) if buffers else torch.zeros(0, dtype=torch.uint8, device=device)
    # step 2: one all-to-all over the EP group
    got = exchange_rows(flat, recv_splits, send_splits, layer.ep_group) if _distributed() else flat
    # step 3: each arriving state into its slot's tensors, then the layer's relabel
    for i, (_, l) in enumerate(takes):
        states = unpack(got[i * size:(i + 1) * size], layout, len(params[l]))
        for p, state in zip(params[l], states):
            access.write(p, state)
    layer.relabel_homes(new)
    found = layer.large_ep_clones() if refresh and callable(getattr(layer, "large_ep_clones", None)) else None
    if found is not None:
        refresh_clones([found])
    return flat.numel()


def window_figures(home: Sequence[Sequence[int]], topology: Topology, coact_EE: torch.Tensor, *, top_k: int,
                   row_bytes: float) -> dict[str, Any]:
    """The model's figures of ``home`` on a window's co-activation (what ``plan_moves`` compares), for reports."""
    seconds, tokens = layout_figures(home, topology, torch.diagonal(coact_EE), coact_EE, top_k=top_k,
                                     row_bytes=row_bytes)
    return {"link_seconds": seconds, "max_link_tokens": max(max(r) for r in tokens), "link_tokens": tokens}
