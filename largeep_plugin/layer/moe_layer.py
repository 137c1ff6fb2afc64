"""The large expert-parallel MoE layer: the one place that wires router -> dispatcher -> expert -> combine.

Shape legend:
    T  tokens on this rank      H  hidden size      E  experts      K  top_k      R  ranks in the EP group
    M  rows received by this rank's expert(s)          L  most experts one rank holds (1 unless colocated)

One forward:
    1. route locally (router.py); count assignments and drops
    2. the global counts, drops and every rank's input check ride in the dispatch's count exchange (one small
       all_to_all, no collective of their own): a bad input on one rank is an error on all ranks before any token
       moves, not a hang in the all-to-all
    3. dispatch (dispatcher.py): permute by destination, exchange counts, all-to-all
    4. the expert MLP on the received rows: one dense GEMM pair
    5. combine: reverse all-to-all, weighted sum over the K choices
    (the shared expert, when configured, runs on the rank's own tokens while the rows of step 3 are in flight, and
    its output is added: shared_experts.py, ``TokenExchange``'s ``side``)

Colocated experts (more experts than ranks, opt-in through a placement planned with ``allow_colocate=True``):
every rank runs ``LocalExperts`` (experts.py), the source sorts each destination's rows by the slot of their
expert there (``dispatcher.py``: counts exchanged per (rank, slot), no expert ids sent), and the receiver runs
each local expert on its own rows. Every dispatch path runs it: flat or node-batched (the gateway forwards copies
sorted by (local rank, slot)), chunked or not (the one count exchange carries counts per (chunk, rank, slot)); a
warning says so once per placement and world (rank 0, notices.py).
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from .clones import CloneSlots, clone_layers, rebalance_layers, refresh_clones as refresh_clone_slots
from .comm import LoadRide, ProcessGroup, group_rank, group_size
from .config import LargeEPConfig
from .token_exchange import TokenExchange
from largeep_plugin.placement.plan import Placement
from largeep_plugin.placement.topology import Topology
from .process_groups import ExpertProcessGroups, NodeGroups, ep_ranks_of, layer_expert_groups
from .expert_slots import rank_to_experts_of, slot_table
from .experts import ExpertMLP, LocalExperts
from .overlap import SideJob
from .shared_experts import build_shared_expert, shared_expert_output
from .load_balance import LoadStats, apply_bias_updates, sequence_aux_loss, switch_aux_loss, z_loss
from .moves import HomeMoves, move_layers, replace_layers
from .notices import warn_once
from .recompute import LoadCounting
from .router import Router, RoutingResult

# Bits of the per-rank input check exchanged in step 2.
_BAD_HIDDEN = 1
_NON_FINITE = 2
_BAD_DTYPE = 4
_STALE_CLONES = 8
# Input dtypes travel in step 2 as 1 + their index here: the same list on every rank, as torch is the same.
_DTYPES = sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on ``y`` whose backward also sends a gradient into ``loss``: the auxiliary losses join the
    backward pass without the trainer having to add them to its loss. The gradient is the layer's
    ``aux_loss_scale`` read when the backward runs (a trainer may set it between forward and backward)."""

    @staticmethod
    def forward(ctx, y, loss, layer):  # type: ignore[override]
        ctx.loss_shape, ctx.layer = loss.shape, layer
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        scale = torch.as_tensor(ctx.layer.aux_loss_scale, dtype=torch.float32, device=grad_y.device)
        return grad_y, scale.expand(ctx.loss_shape).clone(), None


class LargeEPMoE(nn.Module):
    """A Mixture-of-Experts layer over ``ep_group``: one expert per rank, or as a ``placement`` says (replicas of
    hot experts on spare ranks; several experts on a rank when explicitly colocated).

    Args:
        config: the layer's settings.
        ep_group: the expert-parallel group; None means the default (world) group, or a single process when
            torch.distributed is not initialised.
        placement: which expert each rank holds and where each token's copy goes (placement/plan.py). None means
            expert e on rank e, which needs the group size to equal ``num_experts``. A placement that colocates
            experts (``plan_placement(..., allow_colocate=True)``) is the explicit opt-in to several experts per
            rank: it warns once; every dispatch setting runs it.
            A placement with ``expert_tp_degree`` t > 1 splits each copy of an expert over t consecutive ranks
            (``ExpertMLP`` shards; each token goes to all t, their partial outputs add up in the combine).
        ranks_per_node: ranks of one node, consecutive in the EP group; needed by ``dispatch="hierarchical"``
            (at least two nodes, else ValueError). Default: from ``node_groups`` or the placement's topology.
        dp_group: with several data-parallel copies of the EP group, the ranks that hold this EP rank in every
            copy (as ``update_expert_bias`` takes it): the global-batch loss (``global_aux_loss_coeff``) sums the
            counts over it, one all_reduce per forward. None: the EP group's tokens are the whole batch.
        node_groups: ``dispatch="hierarchical"`` only: this rank's node and rail groups
            (``process_groups.build_node_groups``); its two stages then run on them instead of the whole EP group.
        expert_groups: the groups expert gradients are summed over (``process_groups.build_process_groups``).
            When the world holds several data-parallel copies of the EP group, or the placement replicates
            experts, and none are given, the layer builds them: collectively, so every rank of the world must
            construct the layer.

    Attributes:
        router.weight [E, H], router.expert_bias [E]: the router (replicated on every rank).
        expert_ids: the experts this rank holds, ascending (one, unless the placement colocates experts).
        num_home_slots: L, the most experts one rank of the layer holds; num_slots: the expert slots per rank the
            dispatch counts (L, or L + S with ``dynamic_replicas``).
        expert: this rank's ``ExpertMLP`` (see experts.py for the parameter names; with expert TP its shard
            ``tp_rank`` of ``tp_size``); NotImplementedError when the rank holds several experts.
        expert_id: the expert this rank holds; NotImplementedError when it holds several.
        shared_expert, shared_expert_gate: the shared expert (``shared_expert.fc1.weight``, ...) and its gate
            (``shared_expert_gate.weight`` [1, H]) with ``shared_ffn_hidden_size`` / ``shared_expert_gate``, else
            None; dense parameters (averaged over data-parallel ranks like the router's).
        experts: colocated placements only: ``LocalExperts``, slot l holding ``expert_ids[l]`` (state-dict keys
            ``experts.<slot>.fc1.weight``, ...), on every rank of the layer, even one holding a single expert.
            Otherwise the single expert is the submodule ``expert`` (keys ``expert.fc1.weight``, ...).
        last_stats: ``LoadStats`` of the latest forward (global counts, imbalance, rows per rank, drops, losses).
        clones: with ``dynamic_replicas`` S > 0, the ``CloneSlots`` of this rank (S spare slots for clones of hot
            experts, the plan of the EP group: clones.py); None otherwise. Every rank then runs L + S expert slots
            (L: its home experts' slots), whatever the placement; ``largeep_plugin.rebalance(model)`` after each
            optimizer step refreshes the clones and re-plans them.
        moves: with ``replace_every`` N > 0, the ``HomeMoves`` of this rank (moves.py): every N calls of
            ``largeep_plugin.rebalance(model, optimizer)`` the home experts may move between ranks with their
            optimizer state (``relabel_homes`` then changes ``expert_ids``); None otherwise.

    ``forward(x)`` takes ``[..., H]`` and returns the same shape. The auxiliary losses (when their
    coefficients are > 0) are attached to the backward pass; ``forward(x, return_aux=True)`` instead returns
    ``(y, aux)`` with ``aux`` the sum of both losses for the trainer to add itself.
    """

    def __init__(
        self,
        config: LargeEPConfig,
        ep_group: ProcessGroup | None = None,
        placement: Placement | None = None,
        ranks_per_node: int | None = None,
        expert_groups: ExpertProcessGroups | None = None,
        node_groups: NodeGroups | None = None,
        dp_group: ProcessGroup | None = None,
    ):
        super().__init__()
        self.config = config
        self.dp_group = dp_group
        if ep_group is None and expert_groups is not None:
            ep_group = expert_groups.ep_group
        self.ep_group = ep_group
        self.ep_size = group_size(ep_group)
        self.ep_rank = group_rank(ep_group)
        rank_to_experts = rank_to_experts_of(config.num_experts, self.ep_size, placement)
        self.expert_ids = rank_to_experts[self.ep_rank]
        self.placement = placement
        # L: the most home experts one rank holds; the slot dimension of the count exchange (L, or L + S with
        # dynamic replicas), the same on every rank (the collectives must match).
        self.num_home_slots = self.num_slots = max(len(held) for held in rank_to_experts)
        self.colocated = self.num_slots > 1
        clones = config.dynamic_replicas > 0
        # Expert tensor parallelism: t consecutive ranks hold one copy of an expert, shard j on the j-th of them.
        self.tp_size = int(getattr(placement, "expert_tp_degree", 1))
        self.tp_rank = 0
        if self.tp_size > 1:
            self.tp_rank = next(rep.index(self.ep_rank) for rep in placement.replicas(self.expert_ids[0])
                                if self.ep_rank in rep)
        if ranks_per_node is None and node_groups is not None:
            ranks_per_node = node_groups.ranks_per_node
        if ranks_per_node is None and placement is not None and config.dispatch == "hierarchical":
            ranks_per_node = _uniform_ranks_per_node(placement)
        # Steps 3-5 (token_exchange.py): flat or node-batched, pipelined over chunks when overlap_chunks > 1.
        # Built first: an unsupported setting with colocated experts is an error before anything else happens.
        if clones and self.tp_size > 1:
            raise ValueError(f"dynamic_replicas={config.dynamic_replicas} with expert tensor parallelism (the "
                             f"placement's expert_tp_degree={self.tp_size}) is not supported: a clone is a whole "
                             "expert; set dynamic_replicas=0 or use a placement with expert_tp_degree=1")
        self.token_exchange = TokenExchange(config.dispatch_config, ep_group, ranks_per_node,
                                            colocated=self.colocated or clones, node_groups=node_groups)
        self.router = Router(config.router_config, config.hidden_size, init_std=config.init_std, init_seed=config.init_seed)
        if self.colocated:
            self._warn_colocated(rank_to_experts)
            self.experts = LocalExperts(config.expert_config, expert_ids=self.expert_ids, init_seed=config.init_seed)
            # Slot of expert e on rank r (-1: not there); a buffer so that it follows the layer's device.
            self.register_buffer("local_slot_RE", slot_table(rank_to_experts, config.num_experts), persistent=False)
        else:
            self.expert = ExpertMLP(config.expert_config, expert_id=self.expert_ids[0], init_seed=config.init_seed,
                                    tp_rank=self.tp_rank, tp_size=self.tp_size)
        self._join_replica_group(placement, expert_groups)
        self.clones: CloneSlots | None = None
        if clones:
            topology = _ep_topology(placement, ranks_per_node, self.ep_size)
            self.clones = CloneSlots(config, ep_group=ep_group, ep_rank=self.ep_rank, home=rank_to_experts,
                                     topology=topology, template=self.local_experts()[0][1])
            self.num_slots = self.clones.num_slots
        # Which experts each EP rank holds today (moves change it) and the EP group's nodes.
        self._home, self._topology = rank_to_experts, _ep_topology(placement, ranks_per_node, self.ep_size)
        self.moves: HomeMoves | None = None
        if config.replace_every > 0:
            self.moves = HomeMoves(config, ep_group=ep_group, ep_rank=self.ep_rank,
                                   topology=_movable_topology(self, placement, ranks_per_node))
        self.shared_expert, self.shared_expert_gate = build_shared_expert(config)
        self.dispatcher = self.token_exchange.dispatcher
        # Global assignments per expert since the last bias update (summed over forwards and micro-batches).
        self.register_buffer(
            "tokens_per_expert_since_update", torch.zeros(config.num_experts, dtype=torch.int64), persistent=False
        )
        # Global assignments per expert of the global batch so far (global_aux_loss_coeff): summed over the EP group,
        # the data-parallel copies and the training forwards since the last reset_global_load().
        self.register_buffer("global_batch_tokens_E", torch.zeros(config.num_experts, dtype=torch.int64),
                             persistent=False)
        self.last_stats: LoadStats | None = None
        # Gradient the attached auxiliary losses receive (a float or a 0-d tensor, read at backward): set it to
        # whatever the trainer multiplies its loss by (a dynamic fp16 loss scale, 1 / gradient-accumulation
        # steps), as Megatron's MoEAuxLossAutoScaler.set_loss_scale does: ``set_aux_loss_scale(model, s)``; the
        # DeepSpeed integration sets it from the engine.
        self.aux_loss_scale: float | torch.Tensor = 1.0
        # Whether a forward's load counts: once per real training forward, also under activation checkpointing.
        self.load_counting = LoadCounting()

    def _warn_colocated(self, rank_to_experts: tuple[tuple[int, ...], ...]) -> None:
        # Once per placement and world (rank 0), so a model of many layers on many ranks warns once.
        warn_once(f"LargeEPMoE: {self.config.num_experts} experts on {self.ep_size} ranks, up to {self.num_slots} "
                  "per rank (colocated experts: each rank runs its experts one after another)",
                  key=("colocated", rank_to_experts))

    @property
    def expert(self) -> nn.Module:
        """This rank's expert, when it holds exactly one."""
        if "expert" in self._modules:
            return self._modules["expert"]  # type: ignore[return-value]
        if len(self.expert_ids) == 1:
            return self.experts[0]
        raise NotImplementedError(f"EP rank {self.ep_rank} holds experts {self.expert_ids}: use .experts")

    @property
    def expert_id(self) -> int:
        """The expert this rank holds, when it holds exactly one."""
        if len(self.expert_ids) != 1:
            raise NotImplementedError(f"EP rank {self.ep_rank} holds experts {self.expert_ids}: use .expert_ids")
        return self.expert_ids[0]

    def local_experts(self) -> list[tuple[int, nn.Module]]:
        """(expert id, module) of every expert this rank holds, in ``expert_ids`` order."""
        modules = list(self.experts) if self.colocated else [self.expert]
        return list(zip(self.expert_ids, modules))

    def large_ep_clones(self) -> tuple[CloneSlots, list[nn.Module]] | None:
        """(the clone slots, the home experts in slot order) with dynamic replicas, else None (``rebalance``)."""
        if self.clones is None:
            return None
        return self.clones, [m for _, m in self.local_experts()]

    def home_layout(self) -> tuple[tuple[int, ...], ...]:
        """[R] the home experts of every EP rank today (the placement's, or what moves made of it)."""
        return self._home

    @torch.no_grad()
    def relabel_homes(self, home: tuple[tuple[int, ...], ...]) -> None:
        """Say that the home slots now hold ``home`` ([R], the same number per rank as before, each expert once):
        routing, the slot table, the experts' ids and the clone plan follow. Only the bookkeeping: the weights
        and optimizer state are moved first by ``moves.move_experts`` (or loaded by a checkpoint)."""
        e = self.config.num_experts
        self._home = tuple(tuple(int(x) for x in h) for h in home)
        self.expert_ids = self._home[self.ep_rank]
        for expert_id, (_, module) in zip(self.expert_ids, self.local_experts()):
            module.expert_id = expert_id
        if self.colocated:
            self.experts.expert_ids = self.expert_ids
            self.local_slot_RE.copy_(slot_table(self._home, e))
        self.placement = Placement(topology=self._topology, num_experts=e, rank_to_experts=self._home)
        if self.clones is not None:
            self.clones.relabel_homes(self._home)

    def _join_replica_group(self, placement: Placement | None, expert_groups: ExpertProcessGroups | None) -> None:
        """Tag each local expert's parameters with the group its gradients are summed over (``grads.py``): every
        rank, in every data-parallel copy of the EP group, that holds the same expert.

        Groups are needed when an expert has replicas or the world holds several copies of the EP group. They are
        built here when not given (``process_groups.layer_expert_groups``); each layer built that way creates its own
        groups, so for more than a few layers build them once with ``layer_expert_groups`` and pass
        ``expert_groups`` to every layer (``hf.convert_model`` does)."""
        my_ep_ranks = ep_ranks_of(self.ep_group)
        if expert_groups is None:
            expert_groups = layer_expert_groups(placement, self.config.num_experts, self.ep_group)
            if expert_groups is None:
                return  # one copy of every expert: nothing to reduce, no group to build
        elif tuple(expert_groups.ep_ranks) != tuple(my_ep_ranks):
            raise ValueError(
                f"expert_groups were built for the EP ranks {list(expert_groups.ep_ranks)}, but this layer's "
                f"ep_group holds {my_ep_ranks}: build them with ep_ranks matching the EP groups"
            )
        for expert_id, module in self.local_experts():
            group = expert_groups.expert_dp_groups.get(expert_id)
            for p in module.parameters():
                p.expert_dp_group = group

    # ---- forward -----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, return_aux: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        bad = _BAD_HIDDEN if x.dim() == 0 or x.shape[-1] != cfg.hidden_size else 0
        allowed = self._input_dtypes(x.device)
        bad |= 0 if allowed is None or x.dtype in allowed else _BAD_DTYPE
        if bad and not cfg.check_inputs:
            raise ValueError(self._describe_problems({self.ep_rank: bad}, x))
        x_TH = x.reshape(-1, cfg.hidden_size) if not bad else x.new_zeros((0, cfg.hidden_size))
        homes = [module for _, module in self.local_experts()]
        slot_experts = None
        if self.clones is not None:
            self.clones.prepare(homes)
            bad |= _STALE_CLONES if self.clones.stale(homes) else 0
            if bad & _STALE_CLONES and not cfg.check_inputs:
                raise ValueError(self._describe_problems({self.ep_rank: bad}, x))
            # The clones' weights, tied to x: their gradients go home once x's gradient is complete (clones.py).
            (x_TH,), slot_experts = self.clones.bind((x_TH,), homes, cfg.expert_config,
                                                     stand_in=cfg.overlap_chunks > 1)

        # Step 1: route locally, and pick the rank (and slot) of every assignment.
        routing = self.router(x_TH)
        local_slot_TK = None
        if self.clones is not None:
            dest_rank_TK, local_slot_TK = self.clones.destinations(routing.topk_ids_TK)
        else:
            dest_rank_TK = self._destination_ranks(routing.topk_ids_TK)
            if self.colocated:
                local_slot_TK = self.local_slot_RE[dest_rank_TK, routing.topk_ids_TK]
        keep_TK, weights_TK = routing.keep_TK, routing.topk_weights_TK
        # Only training forwards count the load (the bias update's, the global-batch loss's, the clone planner's,
        # the moves' co-activation), each once: an activation-checkpoint recompute does not count again
        # (recompute.py).
        counts = self.load_counting.counts(self.training)
        if self.moves is not None and counts:
            self.moves.observe(routing.topk_ids_TK, keep_TK, dest_rank_TK)
        if self.tp_size > 1:
            # Each (token, k) goes to all t shards of its replica, with the same weight: the combine's weighted
            # sum over the K*t copies adds the shards' partial sums into the expert's output.
            t = self.tp_size
            dest_rank_TK = (dest_rank_TK.unsqueeze(-1) + torch.arange(t, device=dest_rank_TK.device)).flatten(1)
            keep_TK, weights_TK = keep_TK.repeat_interleave(t, dim=1), weights_TK.repeat_interleave(t, dim=1)

        # Step 2: every rank's input check (a flag) rides in the dispatch's one count exchange and is read back with
        # the counts, so a bad input on any rank is an error on every rank before a token moves. The per-expert load,
        # drops and rows per rank are summed over the group on the device: in the same exchange for small groups (no
        # collective of their own; the sums also reach the host in its read-back, for the clone planner), or, when
        # R copies of them would be too many numbers, in an asynchronous all_reduce that runs while the tokens
        # travel (comm.load_rides_in_count_exchange).
        e, r = cfg.num_experts, self.ep_size
        load_X = torch.zeros(e + 1 + r, dtype=torch.int64, device=x_TH.device)
        load_X[:e] = routing.tokens_per_expert_E
        load_X[e] = routing.num_dropped
        # Rows each rank will compute: the kept assignments by destination (scatter-add, no sync).
        to_R = torch.where(keep_TK, dest_rank_TK, r).reshape(-1)
        load_X[e + 1:] = torch.zeros(r + 1, dtype=torch.int64, device=x_TH.device).scatter_add_(
            0, to_R, torch.ones_like(to_R))[:r]
        flag = torch.zeros(1, dtype=torch.int64, device=x_TH.device)
        if cfg.check_inputs:
            # One number per rank: the problem bits, and above them the input dtype (ranks that feed different
            # dtypes would post all-to-alls of different byte sizes: a crash, not an error).
            flag[0] = bad + _NON_FINITE * (~torch.isfinite(x_TH).all()).long() + ((1 + _DTYPES.index(x.dtype)) << 8)
        ride = LoadRide(load_X, flag, self.ep_group, self.ep_size)
        counting = self.clones is not None and counts

        def on_shared(flags_R: list[int], sums_X: torch.Tensor, host_sums: list[int] | None) -> None:
            problems = {r: f & 0xFF for r, f in enumerate(flags_R) if f & 0xFF}
            dtypes = {r: _DTYPES[(f >> 8) - 1] for r, f in enumerate(flags_R) if f >> 8}
            if problems or len(set(dtypes.values())) > 1:
                raise ValueError(self._describe_problems(problems, x, dtypes))
            ride.take(sums_X)
            if counting and ride.fold:
                self.clones.observe(host_sums, None)  # type: ignore[union-attr]

        # Steps 3-5: dispatch, expert, combine.
        shared = dict(shared_X=ride.shared_X, on_shared=on_shared,
                      side=self._shared_expert_job(x_TH))
        if slot_experts is not None:
            y_TH = self.token_exchange(x_TH, dest_rank_TK, keep_TK, weights_TK, slot_experts,  # type: ignore[arg-type]
                                       local_slot_TK=local_slot_TK, num_slots=self.num_slots, **shared)
        elif self.colocated:
            y_TH = self.token_exchange(x_TH, dest_rank_TK, keep_TK, weights_TK, self.experts,
                                       local_slot_TK=local_slot_TK, num_slots=self.num_slots, **shared)
        else:
            y_TH = self.token_exchange(x_TH, dest_rank_TK, keep_TK, weights_TK, self.expert, **shared)
        if shared["side"] is not None:
            y_TH = y_TH + shared["side"].output
        load = ride.total()
        if counting and not ride.fold:
            self.clones.observe(None, load)  # type: ignore[union-attr]
        # On the device: the stats stay there until someone reads them.
        global_counts_E, dropped, rows_R = load[:e], load[e], load[e + 1:]

        aux = self._aux_losses(routing.scores_TE, routing.logits_TE, global_counts_E)
        aux = (aux[0] + self._sequence_and_global_losses(routing, global_counts_E, x, counts), aux[1])
        if counts:
            with torch.no_grad():
                self.tokens_per_expert_since_update += global_counts_E
        self.last_stats = LoadStats(
            tokens_per_expert_E=global_counts_E.detach(),
            dropped=dropped,
            aux_loss=aux[0].detach(),
            z_loss=aux[1].detach(),
            rows_per_rank_R=rows_R,
        )
        y = y_TH.view(x.shape)
        total_aux = aux[0] + aux[1]
        if return_aux:
            return y, total_aux
        if total_aux.requires_grad:
            y = _AttachAuxLoss.apply(y, total_aux, self)
        return y

    def _shared_expert_job(self, x_TH: torch.Tensor) -> SideJob | None:
        """The shared expert on this rank's tokens, as a job the token exchange runs during the dispatch."""
        if self.shared_expert is None:
            return None
        expert, gate = self.shared_expert, self.shared_expert_gate
        params = tuple(expert.parameters()) + (tuple(gate.parameters()) if gate is not None else ())
        return SideJob(lambda x: shared_expert_output(expert, gate, x), x_TH, params)

    def _destination_ranks(self, topk_ids_TK: torch.Tensor) -> torch.Tensor:
        if self.placement is None:
            return topk_ids_TK  # expert e lives on rank e
        return self.placement.destination_ranks(topk_ids_TK, self.ep_rank)

    def _aux_losses(self, scores_TE: torch.Tensor, logits_TE: torch.Tensor, global_counts_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        zero = scores_TE.new_zeros(())
        aux = zero
        if cfg.aux_loss_coeff > 0:
            aux = cfg.aux_loss_coeff * switch_aux_loss(scores_TE, global_counts_E, cfg.top_k, cfg.score_function)
        zl = zero
        if cfg.z_loss_coeff > 0:
            zl = cfg.z_loss_coeff * z_loss(logits_TE)
        return aux, zl

    def _sequence_and_global_losses(self, routing: RoutingResult, global_counts_E: torch.Tensor,
                                    x: torch.Tensor, counts: bool) -> torch.Tensor:
        """The sequence-wise and global-batch balancing losses, coefficients applied (0 when both are off).

        A sequence is ``x[..., s, :]`` of one leading index (``[B, S, H]``: B sequences; ``[T, H]``: one). The
        global batch is the EP group's tokens, summed over ``dp_group`` and over the training forwards since
        ``reset_global_load`` (``counts``: this forward's tokens join them; a recompute reads them as they are)."""
        cfg = self.config
        loss = routing.scores_TE.new_zeros(())
        if cfg.seq_aux_loss_coeff > 0:
            t = routing.scores_TE.shape[0]
            seq_len = x.shape[-2] if x.dim() >= 3 else max(t, 1)
            sequence_T = torch.arange(t, device=routing.topk_ids_TK.device) // seq_len
            loss = loss + cfg.seq_aux_loss_coeff * sequence_aux_loss(
                routing.scores_TE, routing.topk_ids_TK, sequence_T, t // seq_len, cfg.score_function)
        if cfg.global_aux_loss_coeff > 0:
            batch_E = global_counts_E.clone()
            if self.dp_group is not None and group_size(self.dp_group) > 1:
                dist.all_reduce(batch_E, group=self.dp_group)
            if counts:
                with torch.no_grad():
                    self.global_batch_tokens_E += batch_E
            if self.training and torch.is_grad_enabled():
                batch_E = self.global_batch_tokens_E.clone()
            loss = loss + cfg.global_aux_loss_coeff * switch_aux_loss(
                routing.scores_TE, batch_E, cfg.top_k, cfg.score_function)
        return loss

    @torch.no_grad()
    def reset_global_load(self) -> None:
        """Start a new global batch for the global-batch loss (call after the optimizer step)."""
        self.global_batch_tokens_E.zero_()
        self.load_counting.reset()

    def _input_dtypes(self, device: torch.device) -> set[torch.dtype] | None:
        """Input dtypes the local experts can take: their parameters' dtype, and autocast's when it is on (any other
        fails inside an expert on another rank, after the all-to-all); None (any) for an expert without
        parameters."""
        weight = next(self.local_experts()[0][1].parameters(), None)
        if weight is None:
            return None
        allowed = {weight.dtype}
        if torch.is_autocast_enabled(device.type):
            allowed.add(torch.get_autocast_dtype(device.type))
        return allowed

    def _describe_problems(self, problems: dict[int, int], x: torch.Tensor,
                           dtypes: dict[int, torch.dtype] | None = None) -> str:
        parts = []
        hidden = [r for r, f in problems.items() if f & _BAD_HIDDEN]
        nonfinite = [r for r, f in problems.items() if f & _NON_FINITE]
        wrong_dtype = [r for r, f in problems.items() if f & _BAD_DTYPE]
        dtypes = dtypes or {self.ep_rank: x.dtype}
        if hidden:
            mine = f" (this rank's input has shape {tuple(x.shape)})" if self.ep_rank in hidden else ""
            parts.append(
                f"input hidden size does not match hidden_size={self.config.hidden_size} on EP rank(s) {hidden}{mine}"
            )
        if nonfinite:
            parts.append(f"input contains NaN or Inf on EP rank(s) {nonfinite}")
        if wrong_dtype:
            mine = sorted(str(d).replace("torch.", "") for d in self._input_dtypes(x.device) or ())
            parts.append(f"input dtype does not match the expert parameters' (or autocast's) on EP rank(s) "
                         f"{wrong_dtype}: {_by_dtype({r: dtypes[r] for r in wrong_dtype if r in dtypes})} "
                         f"(this rank takes {' or '.join(mine)})")
        if len(set(dtypes.values())) > 1:
            parts.append(f"input dtype differs between EP ranks: {_by_dtype(dtypes)}; every rank must feed the same")
        stale = [r for r, f in problems.items() if f & _STALE_CLONES]
        if stale:
            parts.append(f"the home experts of EP rank(s) {stale} changed since their clones were refreshed: call "
                         "largeep_plugin.rebalance(model) after every optimizer step, and "
                         "largeep_plugin.refresh_clones(model) after setting expert weights by hand (dynamic_replicas)")
        return "LargeEPMoE: " + "; ".join(parts)

    # ---- load balancing ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_expert_bias(self, dp_group: ProcessGroup | None = None) -> None:
        """Apply the aux-loss-free bias update from the global counts since the last call, then reset them.
        Call after the optimizer step; every rank of the EP group computes the same update.

        Args:
            dp_group: with several data-parallel copies of the EP group, the group of ranks that hold the same
                EP rank in every copy: the counts are summed over it first, so all copies keep one bias.
        """
        apply_bias_updates([self.router.expert_bias], [self.tokens_per_expert_since_update],
                           [self.config.bias_update_rate], dp_group)
        self.reset_global_load()

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"experts={c.num_experts}, top_k={c.top_k}, hidden={c.hidden_size}, ffn={c.ffn_hidden_size}, "
            f"ep_size={self.ep_size}, expert_ids={self.expert_ids}, activation={c.activation}"
        )


def _by_dtype(dtypes: dict[int, torch.dtype]) -> str:
    """"float16 on rank(s) [0], float32 on rank(s) [1, 2]"."""
    ranks: dict[str, list[int]] = {}
    for r, d in sorted(dtypes.items()):
        ranks.setdefault(str(d).replace("torch.", ""), []).append(r)
    return ", ".join(f"{d} on rank(s) {rs}" for d, rs in ranks.items())


def _ep_topology(placement: Placement | None, ranks_per_node: int | None, ep_size: int) -> Topology:
    """The EP group's ranks as nodes, for the clone planner: the placement's topology, else nodes of
    ``ranks_per_node`` consecutive ranks, else one node."""
    topology = getattr(placement, "topology", None)
    if topology is not None:
        return topology
    if ranks_per_node and ep_size % ranks_per_node == 0 and ranks_per_node < ep_size:
        return Topology.uniform(ep_size // ranks_per_node, ranks_per_node)
    return Topology.uniform(1, ep_size)


def _movable_topology(layer: LargeEPMoE, placement: Placement | None, ranks_per_node: int | None) -> Topology:
    """The EP group's topology for ``replace_every`` (``_ep_topology``), after refusing what moves cannot do: an
    expert with several homes (static replicas) or split over ranks (expert tensor parallelism)."""
    if layer.tp_size > 1:
        raise NotImplementedError(f"replace_every={layer.config.replace_every} with expert tensor parallelism (the "
                                  f"placement's expert_tp_degree={layer.tp_size}) is not supported: set "
                                  "replace_every=0")
    if placement is not None and max(placement.num_replicas) > 1:
        raise NotImplementedError(f"replace_every={layer.config.replace_every} with static replicas (experts "
                                  f"{[e for e, n in enumerate(placement.num_replicas) if n > 1]} on several ranks) is "
                                  "not supported: their replica groups are process groups fixed at construction; "
                                  "use dynamic_replicas for hot experts, or set replace_every=0")
    return _ep_topology(placement, ranks_per_node, layer.ep_size)


def _uniform_ranks_per_node(placement: Placement) -> int | None:
    """Ranks per node of the placement's topology when every node has the same number, else None."""
    topology = getattr(placement, "topology", None)
    if topology is None:
        return None
    sizes = {len(topology.ranks_of(n)) for n in range(topology.num_nodes)}
    return sizes.pop() if len(sizes) == 1 else None


def moe_layers(model: nn.Module) -> Iterator[tuple[str, LargeEPMoE]]:
    """Every ``LargeEPMoE`` in ``model`` with its qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, LargeEPMoE):
            yield name, module


def update_expert_biases(model: nn.Module, dp_group: ProcessGroup | None = None) -> int:
    """Apply the bias update of every large-EP layer in ``model``, after the optimizer step (``dp_group``: see
    ``update_expert_bias``; one all_reduce for all layers); returns how many layers were updated."""
    return update_layer_biases([layer for _, layer in moe_layers(model)], dp_group)


def update_layer_biases(layers: list[LargeEPMoE], dp_group: ProcessGroup | None = None) -> int:
    """``update_expert_biases`` for a list of layers that share ``dp_group``."""
    n = apply_bias_updates([layer.router.expert_bias for layer in layers],
                           [layer.tokens_per_expert_since_update for layer in layers],
                           [layer.config.bias_update_rate for layer in layers], dp_group)
    for layer in layers:
        layer.reset_global_load()  # a new global batch begins with the next step
    return n


def rebalance(model: nn.Module | list[nn.Module], optimizer: Any = None,
              dp_group: ProcessGroup | None = None) -> list[dict[str, Any]]:
    """After every optimizer step, beside ``update_expert_biases``: each layer with ``replace_every`` counts the
    step and, when due, moves its home experts if a better layout is worth it, with their state in ``optimizer``
    (a torch optimizer, or a route's ``StateAccess``; needed with ``replace_every``; ``dp_group``: with
    data-parallel copies of the EP group, the ranks holding this EP rank in every copy, moves.py). Then each layer
    with ``dynamic_replicas`` (the core layer, Megatron's ``LargeEPMoELayer``; ``model`` may be a list of model
    chunks) folds the step's load into its average, re-plans its clones every ``rebalance_every`` calls, and every
    clone gets its home's new weights (one all-to-all per EP group for all layers). Collective: every rank calls
    it. Returns the records: the moves' decisions (``{"layer", "kind": "move", "step", "moved", "bytes", ...}``,
    moves.py) and the clones' re-plans (``{"layer", "step", "changed", "clones", "moved", ...}``, see
    ``CloneSlots.end_step``); ``[]`` for a model with neither."""
    moved = [{"kind": "move", **r} for r in replace_layers(move_layers(model), optimizer, dp_group)]
    return moved + rebalance_layers(clone_layers(model))


def refresh_clones(model: nn.Module | list[nn.Module]) -> int:
    """Copy every home expert's weights into its clones without re-planning: after loading a checkpoint or changing
    the experts' weights by hand. Collective; returns the bytes this rank sent."""
    return refresh_clone_slots([(slots, homes) for _, slots, homes in clone_layers(model)])


def load_stats(model: nn.Module) -> dict[str, Any]:
    """``{layer name: LoadStats}`` of the latest forward of every large-EP layer in ``model``."""
    return {name: layer.last_stats for name, layer in moe_layers(model) if layer.last_stats is not None}


def set_aux_loss_scale(model: nn.Module, scale: float | torch.Tensor) -> int:
    """Set the gradient every large-EP layer of ``model`` sends into its attached auxiliary losses to ``scale``:
    what the trainer multiplies its loss by before backward (``1 / n`` when it divides each of n accumulated
    micro-batches' losses by n; times a dynamic loss scale). Read when the backward runs. Returns the layer count."""
    layers = [layer for _, layer in moe_layers(model)]
    for layer in layers:
        layer.aux_loss_scale = scale
    return len(layers)
