"""The plugin's all-to-all behind Megatron's six-method ``MoETokenDispatcher`` contract.

Shape legend:
    T  tokens on this rank      H  hidden size      E  experts      K  top_k
    M  rows this rank's expert(s) receive      R  ranks in the EP group      L  expert slots per rank (colocated)

Megatron's ``MoELayer`` drives a dispatcher through six stages (so that its EP overlap can schedule them):

    dispatch_preprocess(x, routing_map_TE, probs_TE)  local    top-k lists, destinations, rows and weights in
                                                               send order: (tokens_AH, probs_A)
    token_dispatch(tokens_AH, probs_A)                comm     count exchange + all-to-all of the rows and one of
                                                               their weights: (rows_MH, probs_M)
    dispatch_postprocess(rows_MH, probs_M)            local    rows for the local expert(s), their counts, probs_M
    (experts)                                         local    expert(rows) * probs_M: the expert weights its rows
    combine_preprocess(out_MH)                        local    nothing to do
    token_combine(out_MH)                             comm     reverse all-to-all + sum over the K choices
    combine_postprocess(y_TH)                         local    back to the input's shape

This is the contract of Megatron's own all-to-all dispatcher: the combine weights travel with the tokens and are
applied by the expert, so every differentiable tensor crosses a stage boundary as a stage argument. Megatron's
fine-grained EP overlap (``overlap_moe_expert_parallel_comm``) runs each stage as a separate schedule node that
detaches its inputs, backpropagates node by node and frees the inputs of the dispatch, expert and combine nodes
right after their forward; nothing differentiable may hide in dispatcher state across nodes, and no backward may
need a freed input. What stays on ``self`` between stages is integer bookkeeping only (send order, counts,
shapes), taken by the next stage: a layer runs one micro-batch's forward at a time, and misuse (combine before
dispatch) is an error, not a silent mix-up.

The token movement is the core ``AllToAllDispatcher`` in its three steps (``route`` / ``exchange`` / ``send``);
the handle carries no weights, so ``combine`` sums the pre-weighted rows.

Shared expert overlap (``moe_shared_expert_overlap``; ``set_shared_experts``): ``dispatch_preprocess`` keeps the
layer input, ``token_dispatch`` runs the shared expert on it while the rows' all-to-all is in flight, and
``combine_postprocess`` adds its output (Megatron's ``MoELayer`` then skips its own shared-expert call). The
shared output is a differentiable tensor on ``self`` between stages, so this mode is refused with Megatron's
fine-grained EP overlap (``integrations/megatron/config.py``).

Colocated experts (a placement with several experts on some rank): ``dispatch_preprocess`` also finds each
assignment's slot on its destination rank, ``token_dispatch`` exchanges counts per (rank, slot) (the core
dispatcher's colocated mode), and ``dispatch_postprocess`` hands the experts the [R, L] counts as
``tokens_per_expert``: ``LocalExperts`` groups the rows by slot and puts the results back in arrival order, so
the weights (in arrival order) and the combine are unchanged.

Expert tensor parallelism (Megatron's ``expert_tensor_parallel_size`` t > 1): the rows travel over Megatron's
``tp_ep`` group (the EP x expert-TP ranks of one copy of the experts; expert-TP rank fastest, so EP rank r's t
shards are its ranks r*t .. r*t+t-1) instead of the EP group. ``dispatch_preprocess`` sends each (token, k) to all
t shards with the same weight, as the core layer does: the combine's weighted sum over the K*t copies adds the
shards' partial outputs into the expert's output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from largeep_plugin.layer.dispatcher import AllToAllDispatcher, DispatchHandle
from largeep_plugin.layer.expert_slots import slot_table


@dataclass(frozen=True)
class _Routed:
    """What ``dispatch_preprocess`` decided, for ``token_dispatch`` (no differentiable tensor: see above)."""

    handle: DispatchHandle
    hidden_shape: torch.Size


def topk_from_routing_map(
    routing_map_TE: torch.Tensor, probs_TE: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's [T, E] routing masks back to top-k lists.

    Returns:
        topk_ids_TK: int64, the chosen experts of each token in expert order; a token with fewer than K kept
            assignments (capacity drops) is padded with unchosen experts ...
        keep_TK: ... which are marked False here.
        topk_weights_TK: ``probs_TE`` at those experts (differentiable; 0 where not kept).
    """
    # A stable sort of "not chosen" puts each token's chosen experts first, in expert order.
    topk_ids_TK = torch.argsort((~routing_map_TE).to(torch.int8), dim=1, stable=True)[:, :top_k]
    keep_TK = routing_map_TE.gather(1, topk_ids_TK)
    topk_weights_TK = probs_TE.gather(1, topk_ids_TK) * keep_TK
    return topk_ids_TK, keep_TK, topk_weights_TK


class LargeEPTokenDispatcher(MoETokenDispatcher):
    """Megatron token dispatcher over the plugin's all-to-all.

    Args:
        config: Megatron's ``TransformerConfig``.
        pg_collection: Megatron's process groups (``ep`` is the EP group).
        ep_rank: this rank in the EP group.
        placement: the plugin's placement (None: expert e on EP rank e).
        rank_to_experts: colocated placements only: the experts of every EP rank (ascending); None: one expert
            per rank.
        expert_tp_size: t, shards of every expert (Megatron's expert-TP group size); t > 1 dispatches over
            ``pg_collection.tp_ep`` (see the module docstring).

    Attributes:
        count_source: set by ``LargeEPMoELayer`` to its router: ``token_dispatch`` sends what the router's
            ``take_shared_counts`` gives (the global load and input checks) along in its count exchange.
    """

    def __init__(
        self, *, config: Any, pg_collection: Any, ep_rank: int, placement: Any = None,
        rank_to_experts: Any = None, expert_tp_size: int = 1,
    ):
        super().__init__(config=config, pg_collection=pg_collection)
        self.top_k = config.moe_router_topk
        self.ep_rank = ep_rank
        self.placement = placement
        self.expert_tp_size = expert_tp_size
        if expert_tp_size > 1 and rank_to_experts is not None:
            raise NotImplementedError(f"expert_tp_size={expert_tp_size} with colocated experts: a rank holds one "
                                      "expert shard under expert tensor parallelism")
        self.dispatcher = AllToAllDispatcher(self.tp_ep_group if expert_tp_size > 1 else self.ep_group)
        self.num_slots = 1
        self.local_slot_RE: torch.Tensor | None = None
        if rank_to_experts is not None:
            # Slot of expert e on rank r (-1: not there); L is the same on every rank (the count exchange matches).
            # Built once; moved to the tokens' device on the first forward there and kept (a dispatcher is no
            # nn.Module, so it does not follow .to()).
            self.num_slots = max(len(held) for held in rank_to_experts)
            self.local_slot_RE = slot_table(rank_to_experts, config.num_moe_experts)
        self.count_source: Any = None
        self.clones: Any = None
        # Live re-placement (``replace_every``): the layer's HomeMoves, told each training forward's assignments.
        self.moves: Any = None
        # Per-call state between stages (see the module docstring); each is taken by the next stage.
        self._routed: _Routed | None = None
        self._in_flight: tuple[DispatchHandle, torch.Size] | None = None
        self._combined_shape: torch.Size | None = None
        self._shared_input: torch.Tensor | None = None
        self._shared_output: torch.Tensor | None = None

    def use_clones(self, clones: Any, rank_to_experts: Any) -> None:
        """Dynamic replicas: route by ``clones`` (a ``CloneSlots``: each assignment to a copy of its expert, as
        (rank, slot)) and count per (rank, slot) over the plan's L + S slots, as with colocated experts."""
        self.clones = clones
        self.local_slot_RE = slot_table(rank_to_experts, self.config.num_moe_experts)
        self.num_slots = clones.num_slots

    def relabel(self, home: Any, placement: Any) -> None:
        """The home experts moved: route by ``placement`` (``home`` [R]: the experts of every EP rank)."""
        self.placement = placement
        if self.local_slot_RE is not None:
            self.local_slot_RE = slot_table(home, self.config.num_moe_experts).to(self.local_slot_RE.device)

    def dispatch_preprocess(
        self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Local: the top-k lists, each assignment's destination, and the rows and weights in send order.

        Returns:
            tokens_AH: one row per kept assignment, sorted by destination rank (a new tensor: Megatron's overlap
                frees it after the dispatch).
            probs_A: float32 combine weight of each row (differentiable w.r.t. ``probs``).
        """
        x_TH = hidden_states.reshape(-1, hidden_states.shape[-1])
        topk_ids_TK, keep_TK, weights_TK = topk_from_routing_map(routing_map, probs, self.top_k)
        local_slot_TK = None
        if self.clones is not None:
            dest_rank_TK, local_slot_TK = self.clones.destinations(topk_ids_TK)
        elif self.placement is None:
            dest_rank_TK = topk_ids_TK  # expert e lives on EP rank e
        else:
            dest_rank_TK = self.placement.destination_ranks(topk_ids_TK, self.ep_rank)
        if self.moves is not None and getattr(self.count_source, "load_counted", False):
            self.moves.observe(topk_ids_TK, keep_TK, dest_rank_TK)  # once per training forward (the router's count)
        # Sends per token: K, or K*t under expert TP (every shard of the chosen expert gets the token).
        copies = self.top_k
        if self.expert_tp_size > 1:
            t = self.expert_tp_size
            dest_rank_TK = (dest_rank_TK.unsqueeze(-1) * t + torch.arange(t, device=dest_rank_TK.device)).flatten(1)
            keep_TK, weights_TK = keep_TK.repeat_interleave(t, dim=1), weights_TK.repeat_interleave(t, dim=1)
            copies = self.top_k * t
        if self.local_slot_RE is not None and self.clones is None:
            if self.local_slot_RE.device != topk_ids_TK.device:
                self.local_slot_RE = self.local_slot_RE.to(topk_ids_TK.device)
            local_slot_TK = self.local_slot_RE[dest_rank_TK, topk_ids_TK]
        order_A, send_counts_V = self.dispatcher.route(
            dest_rank_TK, keep_TK, local_slot_TK=local_slot_TK, num_slots=self.num_slots
        )
        # The count exchange and its one host sync belong to this compute-side step, as in Megatron's all-to-all
        # dispatcher: token_dispatch then only moves rows, and under Megatron's EP overlap the host never blocks
        # on the communication node.
        shared = self.count_source.take_shared_counts() if self.count_source is not None else None
        handle = self.dispatcher.exchange(
            order_A, send_counts_V, num_tokens=x_TH.shape[0], top_k=copies,
            topk_weights_TK=None, num_slots=None if self.local_slot_RE is None else self.num_slots,
            shared_X=None if shared is None else shared[0], on_shared=None if shared is None else shared[1],
        )
        self._routed = _Routed(handle, hidden_states.shape)
        if self.shared_experts is not None:
            self._shared_input = hidden_states
        tokens_AH = x_TH.index_select(0, handle.order_A // copies)
        probs_A = weights_TK.reshape(-1).index_select(0, handle.order_A)
        return tokens_AH, probs_A

    def token_dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Communication: the rows and their weights to the experts' ranks (the counts were exchanged in
        ``dispatch_preprocess``). Returns ``(rows_MH, probs_M)``.

        Two all-to-alls, never one merged buffer: Megatron's overlap frees the received rows after the expert's
        forward, and weights that were a view of the same buffer would go with them."""
        routed = self._take("_routed", "token_dispatch", "dispatch_preprocess")
        handle = routed.handle
        during = None
        if self.shared_experts is not None:
            shared_input = self._take("_shared_input", "token_dispatch", "dispatch_preprocess")

            def during() -> None:
                self._shared_output = self.shared_experts(shared_input)

        rows_MH = self.dispatcher.send(hidden_states, handle, during=during)
        probs_M = self.dispatcher.send(probs, handle)
        self._in_flight = (handle, routed.hidden_shape)
        return rows_MH, probs_M

    def dispatch_postprocess(
        self, hidden_states: torch.Tensor, probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Local: with one expert per rank the received rows are already its contiguous input.

        Returns ``(rows_MH, tokens_per_expert, probs_M)``: tokens_per_expert is int64 on the host (Megatron's
        convention), [1] with one expert per rank, [R, L] rows per (source rank, local slot) with colocated experts
        (``LargeEPExperts`` groups the rows by slot itself, with the same counts on the device from
        ``recv_slot_counts_dev``); ``probs_M`` are the rows' combine weights, which the expert applies.

        Under Megatron's fine-grained EP overlap the expert node frees its input (the received rows) right after
        its forward, while the expert's first linear keeps its input for the weight gradient: the rows are then
        copied here (colocated experts gather them by slot, a copy already)."""
        if self.local_slot_RE is not None:
            if self._in_flight is None:
                raise RuntimeError("LargeEPTokenDispatcher.dispatch_postprocess called without token_dispatch first")
            counts_RL = self._in_flight[0].recv_slot_counts
            return hidden_states, torch.tensor(counts_RL, dtype=torch.int64), probs
        if self.config.overlap_moe_expert_parallel_comm and torch.is_grad_enabled():
            hidden_states = hidden_states.clone()
        return hidden_states, torch.tensor([hidden_states.shape[0]], dtype=torch.int64), probs

    def recv_slot_counts_dev(self) -> torch.Tensor | None:
        """The [R, L] rows received per (source rank, slot) of the dispatch in flight, on the device (the count
        exchange's own result: no host-to-device copy); None with one expert per rank or nothing in flight."""
        return None if self._in_flight is None else self._in_flight[0].recv_slot_counts_dev

    def combine_preprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

    def token_combine(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Communication: return the (weighted) expert outputs to their tokens and sum over the K choices."""
        handle, shape = self._take("_in_flight", "token_combine", "token_dispatch")
        self._combined_shape = shape
        return self.dispatcher.combine(hidden_states, handle)

    def combine_postprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Local: back to the layer input's shape ([S, B, H])."""
        shape = self._take("_combined_shape", "combine_postprocess", "token_combine")
        if self.shared_experts is not None:
            return hidden_states.view(shape) + self._take("_shared_output", "combine_postprocess", "token_dispatch")
        return hidden_states.view(shape)

    def _take(self, attr: str, stage: str, before: str) -> Any:
        value = getattr(self, attr)
        if value is None:
            raise RuntimeError(f"LargeEPTokenDispatcher.{stage} called without {before} first")
        setattr(self, attr, None)
        return value
