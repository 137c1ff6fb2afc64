"""The plugin's router behind Megatron's router interface (usable as ``MoESubmodules.router``).

Shape legend:
    T  tokens on this rank      H  hidden size      E  experts      K  top_k      R  ranks in the EP group

``LargeEPRouter`` is the core ``Router`` (same seeded weight [E, H], same float32 ``expert_bias`` [E], same
``route`` function: selection by score + bias, combine weights from the unbiased scores) whose ``forward`` speaks
Megatron's ``RouterInterface``: ``forward(hidden [S, B, H]) -> (probs_TE, routing_map_TE)``.

It also exposes ``local_tokens_per_expert`` [E] (float32, this rank's assignments since the last bias update), the
attribute pair that Megatron's ``finalize_model_grads`` looks for: with ``moe_router_enable_expert_bias`` (sigmoid
only, a Megatron rule) Megatron all-reduces the counts over TP x DP x CP and moves the bias; otherwise the plugin's
hook does the same (``balance.update_large_ep_biases``).

One forward:
    1. route locally (core ``route``)
    2. the global counts (for the switch loss and ``last_stats``), drops, and every rank's "input is finite" flag
       (a NaN on one rank is an error on all ranks, not a hang) go over the EP group. Inside ``LargeEPMoELayer``
       (``counts_in_dispatch``; ``take_shared_counts``) the flags ride in the dispatcher's count exchange, its one
       host sync, and so do the counts unless the switch loss needs them now (then one all_reduce here, on the
       device). A router on its own all-reduces counts and flags and reads the flags on the host.
    3. the balancing losses and the z-loss are attached to ``probs_TE`` with Megatron's ``MoEAuxLossAutoScaler`` so
       that Megatron's schedules scale their gradients like the main loss (micro-batches, loss scale)

The balancing losses (``moe_router_load_balancing_type``, one or several):
    aux_loss         switch loss, assignment fractions over the EP group's tokens of this micro-batch
    seq_aux_loss     switch loss per sequence, averaged: Megatron's input is [S, B, H], so token t = s * B + b
                     belongs to sequence b (t % B); each rank averages its own B sequences
    global_aux_loss  switch loss, fractions over the global batch: the counts of every rank of Megatron's
                     ``tp_dp_cp`` group (all data-parallel copies), summed over the micro-batches since the last
                     ``reset_global_aux_loss_tracker`` (Megatron's ``finalize_model_grads`` calls it every step)
Counts are of the chosen experts (after the bias and the groups); Megatron's own router counts a plain top-k of the
unbiased scores for its losses instead.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    get_default_pg_collection,
    save_to_aux_losses_tracker,
)
from megatron.core.utils import get_pg_rank, get_pg_size

from largeep_plugin.layer.comm import LoadRide, OnShared
from largeep_plugin.layer.config import LargeEPConfig
from largeep_plugin.layer.load_balance import LoadStats, sequence_aux_loss, switch_aux_loss, z_loss
from largeep_plugin.layer.recompute import LoadCounting
from largeep_plugin.layer.router import Router, RoutingResult
from .config import large_ep_config_from_megatron


class LargeEPRouter(Router):
    """Megatron-facing router.

    Args:
        config: Megatron's ``TransformerConfig``.
        pg_collection: Megatron's process groups (None: the default collection of ``parallel_state``).
        large_ep_config: the translated config (None: translate ``config`` without overrides).

    Attributes:
        weight [E, H], expert_bias [E]: as in the core ``Router``.
        local_tokens_per_expert [E]: float32 assignments of this rank since the last bias update (training only).
        bias_managed_by_megatron: True when Megatron's ``finalize_model_grads`` updates the bias.
        last_stats: ``LoadStats`` of the latest forward (global over the EP group).
        counts_in_dispatch: set by ``LargeEPMoELayer``: leave the input check (and, when no switch loss needs
            them during the forward, the global counts) to the dispatcher's count exchange. False: one all_reduce
            and a host read here (the router on its own, e.g. driving Megatron's stock dispatcher).
    """

    def __init__(self, *, config: Any, pg_collection: Any = None, large_ep_config: LargeEPConfig | None = None):
        lep = large_ep_config or large_ep_config_from_megatron(config)
        super().__init__(lep.router_config, lep.hidden_size, init_std=lep.init_std, init_seed=lep.init_seed)
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        self.large_ep_config = lep
        # The group the layer dispatches over: its ranks' loads make the global counts, and their input flags ride
        # in its count exchange. Under expert TP that is Megatron's tp_ep (EP x expert-TP ranks, see
        # integrations/megatron/dispatcher.py), whose ranks route their own tokens.
        expert_tp = getattr(pg_collection, "expt_tp", None)
        self.ep_group = pg_collection.tp_ep if expert_tp is not None and get_pg_size(expert_tp) > 1 else pg_collection.ep
        self.ep_size = get_pg_size(self.ep_group)
        self.ep_rank = get_pg_rank(self.ep_group)
        # Megatron reduces the bias counts over TP x DP x CP; the plugin's own hook uses the same group.
        self.count_group = pg_collection.tp_dp_cp
        self.bias_managed_by_megatron = bool(config.moe_router_enable_expert_bias)
        # With sequence parallelism each TP rank routes different tokens, so the router gradient is summed over
        # TP by finalize_model_grads (the attribute Megatron's own router sets) and the losses are divided by TP.
        self.sequence_parallel = bool(config.sequence_parallel)
        self.weight.sequence_parallel = self.sequence_parallel
        self.tp_size = get_pg_size(pg_collection.tp)
        self.tp_cp_group = pg_collection.tp_cp
        self.num_layers = config.num_layers + (config.mtp_num_layers or 0)
        self.calculate_per_token_loss = bool(config.calculate_per_token_loss)
        self.layer_number: int | None = None
        self.register_buffer(
            "local_tokens_per_expert", torch.zeros(lep.num_experts, dtype=torch.float32), persistent=False
        )
        # global_aux_loss: assignments per expert over tp_dp_cp and the micro-batches since the last reset.
        self.register_buffer(
            "global_tokens_per_expert", torch.zeros(lep.num_experts, dtype=torch.float32), persistent=False
        )
        self.last_stats: LoadStats | None = None
        self.counts_in_dispatch = False
        # Dynamic replicas: the layer's CloneSlots, told each training forward's global load (``observe``).
        self.load_observer: Any = None
        # Whether a forward's load reaches the observer: once per real training forward, also under Megatron's
        # (reentrant) activation recompute, whose first run has no gradients (layer/recompute.py).
        self.load_counting = LoadCounting()
        self._observed = False
        self.load_counted = False
        self._pending_shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool] | None = None

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def _keep_float32(self) -> None:
        # Float16Module casts buffers to bf16/fp16; the bias and the counts must stay exact.
        for name in ("expert_bias", "local_tokens_per_expert", "global_tokens_per_expert"):
            buf = getattr(self, name)
            if buf.dtype != torch.float32:
                setattr(self, name, buf.float())

    def route_tokens(self, x_TH: torch.Tensor) -> RoutingResult:
        """The core routing of ``x_TH`` (no communication, no bookkeeping)."""
        return super().forward(x_TH)

    def forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Route ``input`` [..., H].

        Returns:
            probs_TE: float32 combine weights, the K chosen experts' weights of each token, 0 elsewhere
                (differentiable w.r.t. ``weight``; the auxiliary losses ride on its backward).
            routing_map_TE: bool, True where a token is sent to an expert (capacity drops are False).
        """
        if padding_mask is not None:
            raise NotImplementedError(
                "padding_mask is not supported by the large-EP router (padded tokens would count as load)"
            )
        self._keep_float32()
        cfg = self.large_ep_config
        x_TH = input.reshape(-1, cfg.hidden_size)
        routing = self.route_tokens(x_TH)
        # Whether this forward's load counts (the dispatcher's move statistics read it too).
        self.load_counted = self.load_counting.counts(self.training)
        self._observed = self.load_counted and self.load_observer is not None
        local_X = self._local_counts(routing, x_TH)
        deferred = self.counts_in_dispatch and cfg.aux_loss_coeff == 0
        global_counts_E = dropped = None
        if not deferred:
            global_counts_E, dropped = self._global_counts(local_X, check_flags=not self.counts_in_dispatch)
            if self._observed:
                self.load_observer.observe(None, global_counts_E)

        e = cfg.num_experts
        probs_TE = routing.topk_weights_TK.new_zeros((x_TH.shape[0], e)).scatter(
            1, routing.topk_ids_TK, routing.topk_weights_TK
        )
        routing_map_TE = torch.zeros((x_TH.shape[0], e), dtype=torch.bool, device=x_TH.device).scatter(
            1, routing.topk_ids_TK, routing.keep_TK
        )
        num_sequences = input.shape[1] if input.dim() == 3 else 1  # [S, B, H]: B sequences
        aux, zl = self._losses(routing, global_counts_E, num_sequences)
        if self.training and torch.is_grad_enabled():
            total = self._loss_scale(x_TH.shape[0]) * (aux + zl)
            if total.requires_grad:
                probs_TE = MoEAuxLossAutoScaler.apply(probs_TE, total)
            with torch.no_grad():
                self.local_tokens_per_expert += routing.tokens_per_expert_E.float()
        # Inside the layer the input flags always ride in the dispatcher's count exchange (its one host sync); so
        # do the counts when no switch loss needed them already.
        self._pending_shared = (local_X, aux.detach(), zl.detach(), deferred) if self.counts_in_dispatch else None
        self.last_stats = None
        if not deferred:
            self.last_stats = LoadStats(
                tokens_per_expert_E=global_counts_E, dropped=dropped, aux_loss=aux.detach(), z_loss=zl.detach()
            )
        return probs_TE, routing_map_TE

    def take_shared_counts(self) -> tuple[torch.Tensor, OnShared] | None:
        """For the dispatcher: what to send along in its count exchange, this forward's [E counts | drops | input flag]
        (or the flag alone when the load has its own all_reduce, see ``comm.load_rides_in_count_exchange``), and the
        callback that checks every rank's flag and (when the router did not all_reduce the counts in its forward)
        sets ``last_stats`` from the counts summed on the device. Taken once; None when nothing is pending."""
        pending, self._pending_shared = self._pending_shared, None
        if pending is None:
            return None
        local_X, aux, zl, deferred = pending
        e = self.large_ep_config.num_experts
        observer = self.load_observer if self._observed else None
        # Deferred, the load rides along (or, for a large group, in an all_reduce of its own, waited on the device
        # when the counts arrive); otherwise only the flag does.
        ride = LoadRide(local_X[: e + 1], local_X[e + 1:], self.ep_group, self.ep_size) if deferred else None

        def on_shared(flags_R: list[int], sums_X: torch.Tensor, host_sums: list[int] | None) -> None:
            self._raise_on_bad_input(flags_R)
            if ride is not None:
                ride.take(sums_X)
                total = ride.total()
                self.last_stats = LoadStats(tokens_per_expert_E=total[:e], dropped=total[e], aux_loss=aux, z_loss=zl)
                if observer is not None:  # the load rode along: on the host already, or summed apart
                    observer.observe(host_sums if ride.fold else None, None if ride.fold else total)

        return (local_X[e + 1:] if ride is None else ride.shared_X), on_shared

    def _local_counts(self, routing: RoutingResult, x_TH: torch.Tensor) -> torch.Tensor:
        """int64 [E + 2]: this rank's assignments per expert, its drops, and its input flag (1: NaN or Inf)."""
        e = self.large_ep_config.num_experts
        local_X = torch.zeros(e + 2, dtype=torch.int64, device=x_TH.device)
        local_X[:e] = routing.tokens_per_expert_E
        local_X[e] = routing.num_dropped
        if self.large_ep_config.check_inputs and x_TH.numel():
            local_X[e + 1] = (~torch.isfinite(x_TH).all()).long()
        return local_X

    def _global_counts(self, local_X: torch.Tensor, check_flags: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The counts and drops summed over the EP group, for the switch loss (one all_reduce). Inside the layer the
        input flags are checked in the dispatcher's count exchange: no host sync here. A router used on its own
        (``check_flags``) all-reduces every rank's flag in its own slot too and reads them on the host."""
        e = self.large_ep_config.num_experts
        width = e + 1 + (self.ep_size if check_flags else 0)
        local = torch.zeros(width, dtype=torch.int64, device=local_X.device)
        local[: e + 1] = local_X[: e + 1]
        if check_flags:
            local[e + 1 + self.ep_rank] = local_X[e + 1]
        if self.ep_size > 1:
            dist.all_reduce(local, group=self.ep_group)
        if check_flags and self.large_ep_config.check_inputs:
            self._raise_on_bad_input(local[e + 1:].tolist())
        return local[:e].detach(), local[e].detach()

    def _raise_on_bad_input(self, flags_R: list[int]) -> None:
        bad = [r for r, flag in enumerate(flags_R) if flag]
        if bad:
            raise ValueError(f"LargeEPRouter (layer {self.layer_number}): input contains NaN or Inf on EP rank(s) {bad}")

    def _loss_scale(self, num_tokens: int) -> float:
        # Router gradients are summed over TP under sequence parallelism: divide so the sum is the mean.
        scale = 1.0 / self.tp_size if self.sequence_parallel else 1.0
        if self.calculate_per_token_loss:
            # Megatron then divides all gradients by the number of tokens: undo it for the per-batch losses.
            scale *= num_tokens
        return scale

    def reset_global_aux_loss_tracker(self) -> None:
        """Start a new global batch for ``global_aux_loss`` (Megatron's ``finalize_model_grads`` calls it)."""
        self.global_tokens_per_expert.zero_()

    def _losses(self, routing: RoutingResult, global_counts_E: torch.Tensor | None,
                num_sequences: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The balancing losses (summed) and the z-loss of this rank, coefficients applied (0 when off or not
        training). ``global_counts_E`` may be None only when the switch loss is off; ``num_sequences``: B of
        the [S, B, H] input (token t is in sequence t % B)."""
        cfg = self.large_ep_config
        aux = zl = routing.scores_TE.new_zeros(())
        if not (self.training and torch.is_grad_enabled()):
            return aux, zl
        if cfg.aux_loss_coeff > 0:
            raw = switch_aux_loss(routing.scores_TE, global_counts_E, cfg.top_k, cfg.score_function)
            self._track("load_balancing_loss", raw)
            aux = cfg.aux_loss_coeff * raw
        if cfg.seq_aux_loss_coeff > 0:
            t = routing.scores_TE.shape[0]
            sequence_T = torch.arange(t, device=routing.scores_TE.device) % num_sequences
            raw = sequence_aux_loss(routing.scores_TE, routing.topk_ids_TK, sequence_T, num_sequences,
                                    cfg.score_function)
            self._track("seq_load_balancing_loss", raw)
            aux = aux + cfg.seq_aux_loss_coeff * raw
        if cfg.global_aux_loss_coeff > 0:
            batch_E = routing.tokens_per_expert_E.float()
            if get_pg_size(self.count_group) > 1:
                dist.all_reduce(batch_E, group=self.count_group)
            with torch.no_grad():
                self.global_tokens_per_expert += batch_E
            raw = switch_aux_loss(routing.scores_TE, self.global_tokens_per_expert.clone(), cfg.top_k,
                                  cfg.score_function)
            self._track("global_load_balancing_loss", raw)
            aux = aux + cfg.global_aux_loss_coeff * raw
        if cfg.z_loss_coeff > 0:
            raw = z_loss(routing.logits_TE)
            self._track("z_loss", raw)
            zl = cfg.z_loss_coeff * raw
        return aux, zl

    def _track(self, name: str, value: torch.Tensor) -> None:
        # Megatron-LM prints and logs what is in this tracker (per layer when moe_per_layer_logging).
        if self.layer_number is not None:
            save_to_aux_losses_tracker(
                name, value.detach(), self.layer_number, self.num_layers, reduce_group=self.tp_cp_group
            )
