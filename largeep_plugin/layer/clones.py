"""Dynamic replicas: clones of hot experts in spare slots, re-planned from the load while the model trains.

Shape legend:
    E  experts      R  ranks in the EP group      S  spare slots per rank (``dynamic_replicas``)
    L  home slots (the most home experts one rank holds)      P  numbers in one expert's parameters
    T  tokens of this rank      K  top_k      A  assignments (T*K)

Home experts are the only parameters; a clone is a buffer (no optimizer state, nothing for DDP, ZeRO or
Megatron's DDP to reduce). One training step with ``LargeEPConfig(dynamic_replicas=S)``:

    forward    ``CloneSlots.destinations``: each assignment goes to one copy of its expert (home or clone) by the
               plan's shares, same node first (placement/clones.py), as (rank, slot); the dispatch runs the
               colocated machinery with L + S slots per rank. ``CloneSlots.bind`` hands the slots' experts their
               weights: the home parameters, and the clones' views of their slot buffer, taken through one
               autograd node (``_CloneLink``) whose other input is the layer's input x.
    backward   ``_CloneLink.backward`` runs when x's gradient is complete, i.e. after every token collective of
               the layer's backward, at the same point on every rank. It sends each clone's gradient to the home
               that feeds it (one all-to-all over the EP group, uneven splits) and returns the sum as a gradient
               of the home parameters: autograd adds it to the home's own before the parameter's AccumulateGrad
               runs, so every hook that reduces or buckets gradients (DDP, ZeRO 2, Megatron's DDP) sees the whole
               gradient, once.
    after optimizer.step()
               ``rebalance_layers``: fold the step's load into an EMA, re-plan every ``rebalance_every`` steps
               (placement/clones.py ``replan``: hysteresis), and refresh every clone from its home (one
               all-to-all per EP group for all its layers, uneven splits).

The load comes to the host in the count exchange's one read-back (``comm.exchange_count_rows``): no sync of its
own. For an EP group whose load is too large to ride in that exchange (``comm.load_rides_in_count_exchange``) it
is summed on the device and read once per re-plan, after the optimizer step, outside the forward.

A home parameter changed since the clones were refreshed (an optimizer step without ``rebalance``, weights set by
hand without ``refresh_clones``) is an error on every rank at the next forward (a flag in the count exchange),
never a clone computing with old weights. A loaded checkpoint restores the plan, and the first forward after it
refreshes the clones (every rank of an EP group loads the checkpoint, so every rank does that collective). ``torch.Tensor._version`` tells it: every in-place update of the
parameter moves it (torch optimizers, ``load_state_dict``); a route whose optimizer writes through ``.data`` is
covered by its integration calling ``rebalance`` after each step.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from largeep_plugin.placement.clones import ClonePlan, no_clones, plan_clones, plan_from_clones, replan
from largeep_plugin.placement.topology import Topology

from .comm import ProcessGroup, exchange_rows
from .config import LargeEPConfig
from .experts import LinearWeights, MLPWeights, SlotExperts


@dataclass(frozen=True)
class _Routes:
    """The clone traffic of one plan seen from one rank (host ints, from the plan: no sync).

    Attributes:
        feed: (destination rank, home slot l, destination spare slot s) of every clone this rank feeds, in send
            order (by destination rank, then slot).
        take: (source rank, spare slot s) of every clone slot of this rank, in receive order (by source, slot).
        feed_splits, take_splits: rows per rank, length R.
    """

    feed: tuple[tuple[int, int, int], ...]
    take: tuple[tuple[int, int], ...]
    feed_splits: tuple[int, ...]
    take_splits: tuple[int, ...]


@functools.lru_cache(maxsize=256)
def _routes(plan: ClonePlan, rank: int) -> _Routes:
    transfers = plan.transfers()  # (feeder, home slot, clone rank, spare slot), by clone rank then slot
    feed = tuple((r, l, s) for f, l, r, s in transfers if f == rank)
    take = tuple(sorted((f, s) for f, _, r, s in transfers if r == rank))
    feed_splits = [0] * plan.num_ranks
    take_splits = [0] * plan.num_ranks
    for r, _, _ in feed:
        feed_splits[r] += 1
    for f, _ in take:
        take_splits[f] += 1
    return _Routes(feed, take, tuple(feed_splits), tuple(take_splits))


class CloneSlots(nn.Module):
    """The S spare slots of one rank of a ``LargeEPMoE`` layer, and the plan of the whole EP group.

    Args:
        config: the layer's config (``dynamic_replicas``, ``rebalance_every``, ``rebalance_decay``,
            ``rebalance_margin``; sizes for the figures).
        ep_group, ep_rank: the layer's EP group and this rank's index in it.
        home: [R] the home experts of every EP rank (the layer's placement).
        topology: the EP group's ranks as nodes (the placement's topology; one node when unknown).
        template: one home expert of this rank (the parameter layout every expert shares).

    Buffers:
        weights_SP [S, P] (not saved): the clones' weights, one expert's parameters flattened per slot, in the
            home experts' dtype and device.
        load_ema_E float64 [E], plan_clones_RS int64 [R, S], plan_load_E float64 [E] (saved): the load history and
            the plan (its clones and the load its shares were fitted to), so a resumed run routes exactly as the
            run that saved it. Loading them restores that plan; the next forward refreshes its clones.
    Attributes:
        plan: the current ``ClonePlan``.
        last_replan: a record of the latest re-plan (``rebalance_layers``), for the monitor; None before any.
    """

    def __init__(self, config: LargeEPConfig, *, ep_group: ProcessGroup | None, ep_rank: int,
                 home: tuple[tuple[int, ...], ...], topology: Topology, template: nn.Module):
        super().__init__()
        s, e, r = config.dynamic_replicas, config.num_experts, len(home)
        self.config = config
        self.ep_group, self.ep_rank = ep_group, ep_rank
        self.home, self.topology = home, topology
        self.shapes = tuple((name, tuple(p.shape)) for name, p in template.named_parameters())
        self.numel = sum(math.prod(shape) for _, shape in self.shapes)
        like = next(template.parameters())
        self.register_buffer("weights_SP", torch.zeros(s, self.numel, dtype=like.dtype, device=like.device),
                             persistent=False)
        self.register_buffer("load_ema_E", torch.zeros(e, dtype=torch.float64))
        self.register_buffer("plan_clones_RS", torch.full((r, s), -1, dtype=torch.int64))
        self.register_buffer("plan_load_E", torch.zeros(e, dtype=torch.float64))
        self.plan = no_clones(e, home, s, topology)
        self.last_replan: dict[str, Any] | None = None
        self.steps = 0
        self._host_load = torch.zeros(e, dtype=torch.float64)   # since the last rebalance, from read-backs
        self._device_load: torch.Tensor | None = None            # the same, for a load that did not ride along
        self._versions: tuple[int, ...] | None = ()               # home parameters' versions at the last refresh
        self._refresh_pending = False                             # a plan was loaded: refresh before routing
        self.register_load_state_dict_post_hook(lambda module, incompatible: module._after_load(incompatible))

    # The saved host state: it stays on the host in its own dtype whatever the model is moved or cast to (the
    # planner reads it there, and model.to(bfloat16) must not round counts).
    _HOST_STATE = (("load_ema_E", torch.float64), ("plan_load_E", torch.float64), ("plan_clones_RS", torch.int64))

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        super()._apply(fn, recurse)
        for name, dtype in self._HOST_STATE:
            t = getattr(self, name)
            if t.dtype != dtype or t.device.type != "cpu":
                setattr(self, name, t.to("cpu", dtype))
        return self

    def _after_load(self, _incompatible: Any) -> None:
        """A loaded plan: the clones of ``plan_clones_RS`` with shares fitted to ``plan_load_E``; the next forward
        refreshes their weights (``prepare``)."""
        clones = self.plan_clones_RS.tolist()
        load = self.plan_load_E if float(self.plan_load_E.sum()) > 0 else None
        self.plan = plan_from_clones(self.config.num_experts, self.home, clones, self.topology, load)
        self._versions = None
        self._refresh_pending = True
        self._host_load.zero_()
        self._device_load = None

    def relabel_homes(self, home: tuple[tuple[int, ...], ...]) -> None:
        """The home experts moved (``moves.py``): the same clones, fed from the new homes (a clone that now sits
        on its expert's home rank is dropped); their weights are refreshed by the next ``rebalance``."""
        clones = [[-1 if x in home[r] else x for x in row] for r, row in enumerate(self.plan.clones)]
        load = self.plan_load_E if float(self.plan_load_E.sum()) > 0 else None
        self.home = home
        self.plan = plan_from_clones(self.config.num_experts, home, clones, self.topology, load)
        self.plan_clones_RS.copy_(torch.tensor(self.plan.clones, dtype=torch.int64).view(self.plan_clones_RS.shape))
        self._versions = None

    @torch.no_grad()
    def replan_from(self, load_ema_E: torch.Tensor) -> None:
        """A fresh plan from a load average (a checkpoint of another EP size: its plan was for other ranks); the
        next forward refreshes the clones (``prepare``)."""
        element = self.weights_SP.element_size()
        ema = load_ema_E.to(torch.float64).cpu()
        self.load_ema_E.copy_(ema)
        self.plan = plan_clones(ema, self.home, self.config.dynamic_replicas, self.topology,
                                row_bytes=float(self.config.hidden_size * element),
                                expert_bytes=float(self.numel * element))
        self.plan_clones_RS.copy_(torch.tensor(self.plan.clones, dtype=torch.int64).view(self.plan_clones_RS.shape))
        self.plan_load_E.copy_(ema)
        self._versions, self._refresh_pending = None, True

    @torch.no_grad()
    def reset(self) -> None:
        """Forget the load history and the plan (no clones): after a trainer allocated the buffers without values
        (torchtitan's ``to_empty``)."""
        self.load_ema_E.zero_()
        self.plan_load_E.zero_()
        self.plan_clones_RS.fill_(-1)
        self.weights_SP.zero_()
        self.plan = no_clones(self.config.num_experts, self.home, self.config.dynamic_replicas, self.topology)
        self.last_replan, self.steps = None, 0
        self._host_load.zero_()
        self._device_load, self._versions, self._refresh_pending = None, (), False

    def prepare(self, homes: Sequence[nn.Module]) -> None:
        """At the start of a forward: after a checkpoint was loaded, refresh the clones of its plan (collective over
        the EP group, once)."""
        if self._refresh_pending:
            self._refresh_pending = False
            refresh_clones([(self, homes)])

    # ---- forward -----------------------------------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return self.plan.num_slots

    def stale(self, homes: Sequence[nn.Module]) -> bool:
        """Whether this rank feeds a clone whose home changed since the last refresh (host only, no sync)."""
        if not _routes(self.plan, self.ep_rank).feed:
            return False
        return self._versions is None or self._versions != _versions_of(homes)

    def destinations(self, topk_ids_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dest_rank_TK, local_slot_TK), int64 [T, K]: the copy each assignment goes to.

        The a-th assignment (token order) of expert e out of this rank's n_e takes u = (a + phase) / n_e with
        phase = (rank + 0.5) / R, and goes to the first copy whose cumulative probability (``route_tables``) exceeds
        u: each source splits its n_e assignments between the copies exactly (to one row), not by chance. Device
        work only: a sort and gathers, no sync."""
        cum, rank, slot = self._device_tables(topk_ids_TK.device)
        if cum.shape[-1] == 1:
            return rank[:, 0][topk_ids_TK], slot[:, 0][topk_ids_TK]
        ids_A = topk_ids_TK.reshape(-1)
        tokens_per_expert_E = torch.zeros(self.config.num_experts, dtype=torch.long, device=ids_A.device).scatter_add_(
            0, ids_A, torch.ones_like(ids_A))
        order_A = torch.sort(ids_A, stable=True).indices
        start_E = torch.cumsum(tokens_per_expert_E, 0) - tokens_per_expert_E
        pos_sorted = torch.arange(ids_A.numel(), device=ids_A.device) - start_E[ids_A[order_A]]
        pos_A = torch.empty_like(pos_sorted)
        pos_A[order_A] = pos_sorted
        phase = (self.ep_rank + 0.5) / self.plan.num_ranks
        u_A = (pos_A.to(torch.float64) + phase) / tokens_per_expert_E[ids_A].clamp(min=1).to(torch.float64)
        pick_A = (cum[ids_A] <= u_A.unsqueeze(-1)).sum(-1)
        shape = topk_ids_TK.shape
        return rank[ids_A, pick_A].view(shape), slot[ids_A, pick_A].view(shape)

    def _device_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _tables_on(self.plan, self.topology.node_of(self.ep_rank), device)

    def bind(self, anchors: Sequence[torch.Tensor], homes: Sequence[nn.Module], config: Any, *,
             stand_in: bool = False) -> tuple[tuple[torch.Tensor, ...], SlotExperts]:
        """(the anchors, the ``SlotExperts`` of this forward): the home experts (modules), None for a home slot this
        rank does not have, and each spare slot's clone (None when empty). With gradients on, the anchors and the
        clones' weights come out of one autograd node (``_CloneLink``): its backward returns the clones'
        gradients to their homes once every anchor's gradient is complete. The core layer anchors its input x
        (so the return follows every token collective of its backward); Megatron's experts anchor their input
        rows and combine weights (it follows the combine's, and the dispatch's wait for it).

        ``stand_in`` (the overlap pipeline): the clones compute with a detached leaf of their weights that the
        pipeline differentiates chunk by chunk, handing the sum to the node's output once
        (``SlotExperts.outer_of``); differentiating through the node inside a chunk would run its collective there.
        ``config``: the layer's ``ExpertConfig``."""
        plan, me = self.plan, self.ep_rank
        params = [p for m in homes for p in m.parameters()]
        weights_SP, outer_of, tensors = self.weights_SP, {}, []
        anchors = tuple(anchors)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            *linked, weights_SP = _CloneLink.apply(self, len(anchors), *anchors, *params)
            anchors = tuple(linked)
            if stand_in:
                leaf = weights_SP.detach().requires_grad_(True)
                outer_of, weights_SP = {id(leaf): weights_SP}, leaf
            tensors = [weights_SP] if plan.num_clones else []
        slots: list[nn.Module | MLPWeights | None] = list(homes)
        slots += [None] * (plan.num_home_slots - len(homes))
        slots += [self._views(weights_SP[s]) if x != -1 else None for s, x in enumerate(plan.clones[me])]
        return anchors, SlotExperts(slots, config, tensors, outer_of)

    def _views(self, flat_P: torch.Tensor) -> MLPWeights:
        parts = dict(zip((n for n, _ in self.shapes), _unflatten(flat_P, self.shapes)))
        return MLPWeights(LinearWeights(parts["fc1.weight"], parts.get("fc1.bias")),
                          LinearWeights(parts["fc2.weight"], parts.get("fc2.bias")))

    def observe(self, host_sums: list[int] | None, device_total: torch.Tensor | None) -> None:
        """Count one training forward's global load: ``host_sums`` (the count exchange's read-back, first E are the
        experts) when the load rode along, else ``device_total`` (summed on the device, read at the re-plan)."""
        e = self.config.num_experts
        if host_sums is not None:
            self._host_load += torch.tensor(host_sums[:e], dtype=torch.float64)
        elif device_total is not None:
            part = device_total[:e].to(torch.float64)
            self._device_load = part if self._device_load is None else self._device_load + part

    # ---- after the optimizer step -------------------------------------------------------------------------------
    def end_step(self) -> dict[str, Any] | None:
        """Fold the step's load into the EMA and, every ``rebalance_every`` steps, re-plan (with hysteresis).
        Returns the re-plan's record (also kept as ``last_replan``), None when this step did not re-plan."""
        cfg = self.config
        load = self._host_load.clone()
        if self._device_load is not None:  # a load too large to ride in the count exchange: read once, here
            load += self._device_load.cpu()
        self._host_load.zero_()
        self._device_load = None
        if float(load.sum()) > 0:
            started = float(self.load_ema_E.sum()) > 0
            self.load_ema_E.copy_(load if not started else
                                  cfg.rebalance_decay * self.load_ema_E + (1 - cfg.rebalance_decay) * load)
        self.steps += 1
        ema = self.load_ema_E
        if self.steps % cfg.rebalance_every or float(ema.sum()) <= 0:
            return None
        element = self.weights_SP.element_size()
        sizes = dict(row_bytes=float(cfg.hidden_size * element), expert_bytes=float(self.numel * element))
        old = self.plan
        new, changed = replan(old, ema, self.home, cfg.dynamic_replicas, self.topology, margin=cfg.rebalance_margin,
                              **sizes)
        after = new.figures(ema, **sizes)
        before = after if new is old or (not changed and new.clones == old.clones) else old.figures(ema, **sizes)
        self.plan = new
        self.plan_clones_RS.copy_(torch.tensor(new.clones, dtype=torch.int64).view(self.plan_clones_RS.shape))
        self.plan_load_E.copy_(ema)
        self.last_replan = {
            "step": self.steps, "changed": changed, "clones": [list(c) for c in new.clones],
            "moved": new.moved_from(old) if changed else [],
            "refresh_bytes_per_step": after.refresh_bytes,
            "predicted_rank_imbalance": after.rank_imbalance,
            "predicted_rank_imbalance_before": before.rank_imbalance,
            "predicted_max_link_seconds": after.max_link_seconds,
        }
        return self.last_replan

    # ---- gradient return ----------------------------------------------------------------------------------------
    def return_gradients(self, plan: ClonePlan, grad_SP: torch.Tensor | None, num_params: int) -> list[torch.Tensor | None]:
        """The clones' gradients summed into the home parameters they came from: one all-to-all over the EP group
        (skipped when ``plan`` has no clone: every rank of the group knows it). Returns a gradient for each of the
        ``num_params`` home parameters (home after home, each in ``shapes`` order), None where no clone of that
        home exists."""
        if plan.num_clones == 0:
            return [None] * num_params
        routes = _routes(plan, self.ep_rank)
        dev, dtype = self.weights_SP.device, self.weights_SP.dtype
        if grad_SP is None:  # no clone of this rank computed anything: it still takes part, with zeros
            grad_SP = torch.zeros(self.weights_SP.shape, dtype=dtype, device=dev)
        # Each clone slot's gradient to its feeder; the feeder receives by source rank, then slot.
        take_index, feed_index = _route_indices(plan, self.ep_rank, dev)
        send_NP = grad_SP.index_select(0, take_index)
        got_NP = exchange_rows(send_NP, routes.feed_splits, routes.take_splits, self.ep_group)
        num_homes = num_params // len(self.shapes)
        sum_LP = got_NP.new_zeros((num_homes, self.numel))
        if routes.feed:  # received in feed order (by clone rank, then slot): each row to the home it clones
            sum_LP.index_add_(0, feed_index, got_NP)
        fed = {l for _, l, _ in routes.feed}
        out: list[torch.Tensor | None] = []
        for l in range(num_homes):
            out.extend(_unflatten(sum_LP[l], self.shapes) if l in fed else [None] * len(self.shapes))
        return out


class _CloneLink(torch.autograd.Function):
    """forward(slots, n, *anchors (n of them), *home params) -> (*anchors, the clones' weights [S, P]), all
    unchanged (views). backward: the anchors' gradients pass through; the clones' gradients go to their homes
    (``CloneSlots.return_gradients``)."""

    @staticmethod
    def forward(ctx, slots: CloneSlots, num_anchors: int, *tensors):  # type: ignore[override]
        ctx.slots, ctx.plan = slots, slots.plan
        ctx.num_anchors, ctx.num_params = num_anchors, len(tensors) - num_anchors
        return (*(t.view_as(t) for t in tensors[:num_anchors]), slots.weights_SP.detach())

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        slots, plan = ctx.slots, ctx.plan
        ctx.slots = ctx.plan = None
        *grad_anchors, grad_SP = grads
        return (None, None, *grad_anchors, *slots.return_gradients(plan, grad_SP, ctx.num_params))


def _unflatten(flat_P: torch.Tensor, shapes: Sequence[tuple[str, tuple[int, ...]]]) -> list[torch.Tensor]:
    out, start = [], 0
    for _, shape in shapes:
        n = math.prod(shape)
        out.append(flat_P[start:start + n].view(shape))
        start += n
    return out


def _versions_of(homes: Sequence[nn.Module]) -> tuple[int, ...]:
    return tuple(p._version for m in homes for p in m.parameters())


@functools.lru_cache(maxsize=256)
def _route_indices(plan: ClonePlan, rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """On ``device``, once per plan: the spare slots this rank sends gradients from (``take`` order) and the home
    slot of each gradient it receives (``feed`` order)."""
    routes = _routes(plan, rank)
    return (torch.tensor([s for _, s in routes.take], dtype=torch.long).to(device),
            torch.tensor([l for _, l, _ in routes.feed], dtype=torch.long).to(device))


@functools.lru_cache(maxsize=64)
def _tables_on(plan: ClonePlan, node: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plan's route tables for sources on ``node``, [E, M] each, on ``device`` (copied once per plan)."""
    cum, rank, slot = plan.route_tables()
    return cum[node].to(device), rank[node].to(device), slot[node].to(device)


# ---- after the optimizer step: refresh and re-plan ------------------------------------------------------------------

@torch.no_grad()
def refresh_clones(pairs: Sequence[tuple[CloneSlots, Sequence[nn.Module]]]) -> int:
    """Copy every home expert's current weights into its clones: one all-to-all per EP group (and dtype) for all
    the layers given, uneven splits (a 1-D buffer: layers may differ in size). ``pairs``: (the layer's
    ``CloneSlots``, its home experts in slot order), in the same order on every rank. Returns the bytes this rank
    sent. Every rank of each EP group must call it (a group whose layers hold no clone skips its collective)."""
    by_group: dict[tuple[int, torch.dtype], list[tuple[CloneSlots, Sequence[nn.Module]]]] = {}
    for slots, homes in pairs:
        by_group.setdefault((id(slots.ep_group), slots.weights_SP.dtype), []).append((slots, homes))
    sent = 0
    for items in by_group.values():
        if all(slots.plan.num_clones == 0 for slots, _ in items):
            for slots, homes in items:
                slots._versions = _versions_of(homes)
            continue
        num_ranks = items[0][0].plan.num_ranks
        send: list[list[torch.Tensor]] = [[] for _ in range(num_ranks)]
        recv_splits = [0] * num_ranks
        for slots, homes in items:
            routes = _routes(slots.plan, slots.ep_rank)
            for r, l, _ in routes.feed:
                send[r].append(torch.cat([p.detach().reshape(-1) for p in homes[l].parameters()]))
            for f, _ in routes.take:
                recv_splits[f] += slots.numel
        send_splits = [sum(t.numel() for t in per) for per in send]
        like = items[0][0].weights_SP
        flat = [t for per in send for t in per]
        buffer = torch.cat(flat) if flat else like.new_zeros(0)
        got = exchange_rows(buffer.to(like.dtype), recv_splits, send_splits, items[0][0].ep_group)
        # Unpack by source rank, then layer, then slot: the order every feeder packed in.
        starts = [sum(recv_splits[:f]) for f in range(num_ranks)]
        for slots, homes in items:
            for f, s in _routes(slots.plan, slots.ep_rank).take:
                slots.weights_SP[s].copy_(got[starts[f]:starts[f] + slots.numel])
                starts[f] += slots.numel
            slots._versions = _versions_of(homes)
        sent += buffer.numel() * buffer.element_size()
    return sent


def rebalance_layers(layers: Sequence[tuple[str, CloneSlots, Sequence[nn.Module]]]) -> list[dict[str, Any]]:
    """After an optimizer step: every layer folds its load and re-plans when due (``CloneSlots.end_step``), then
    every clone is refreshed (``refresh_clones``). ``layers``: (name, the layer's ``CloneSlots``, its home
    experts), in the same order on every rank. Collective over each EP group. Returns the re-plans' records, each
    with ``"layer"``: its name."""
    records = []
    for name, slots, _ in layers:
        record = slots.end_step()
        if record is not None:
            records.append({"layer": name, **record})
    refresh_clones([(slots, homes) for _, slots, homes in layers])
    return records


def clone_layers(model: Any) -> list[tuple[str, CloneSlots, list[nn.Module]]]:
    """(name, ``CloneSlots``, home experts) of every layer of ``model`` (a module, or a list of model chunks) with
    dynamic replicas: the modules whose ``large_ep_clones()`` returns its slots and homes (the core layer,
    Megatron's), in model order."""
    out = []
    for chunk in model if isinstance(model, (list, tuple)) else [model]:
        for name, module in chunk.named_modules():
            get = getattr(module, "large_ep_clones", None)
            found = get() if callable(get) else None
            if found is not None:
                out.append((name, *found))
    return out
