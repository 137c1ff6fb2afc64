"""Top-k routing: a pure function plus a thin module that owns the weights.

Shape legend:
    T  tokens on this rank          H  hidden size
    E  experts (all of them)        K  experts chosen per token (top_k)

Selection and weighting are deliberately separate. The experts are *chosen* by ``scores + expert_bias`` (the
aux-loss-free balancing bias moves which experts win), but the combine weights are the *unbiased* scores of the
chosen experts, so the bias never changes how much an expert's output counts.

One routing, step by step (``route``):
    1. logits = x @ weight.T (+ the learned ``router.bias`` with ``router_bias``), in ``router_dtype`` (float32 by
       default) with autocast off: top-k on bf16 scores is full of ties
    2. scores = softmax or sigmoid of the logits
    3. selection = scores + expert_bias; with ``num_groups``, the experts outside a token's ``group_topk`` best
       groups are masked out first (``select_experts``); the top-k of the selection, ties to the lower index
    4. weights = the unbiased scores of the chosen experts, divided by their sum (``normalize_topk``), times
       ``routed_scaling_factor``; then capacity drops (weight 0)
No step reads a value on the host (no ``.item()``, ``nonzero``, boolean-mask indexing): top-k, gather, scatter and
masked_fill only, so routing never synchronises the device with the host (capacity drops aside).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import RouterConfig


@dataclass(frozen=True)
class RoutingResult:
    """What the router hands to the dispatcher.

    Attributes:
        logits_TE: raw router logits, float32.
        scores_TE: softmax or sigmoid of the logits, float32 (the probabilities the aux loss uses).
        topk_ids_TK: chosen experts, int64, ordered by biased score (best first).
        topk_weights_TK: combine weights, float32, differentiable w.r.t. the router weight; 0 where dropped.
        keep_TK: bool, False where the capacity limit dropped the assignment (all True when dropless).
        tokens_per_expert_E: assignments per expert on this rank *before* capacity drops, int64.
    """

    logits_TE: torch.Tensor
    scores_TE: torch.Tensor
    topk_ids_TK: torch.Tensor
    topk_weights_TK: torch.Tensor
    keep_TK: torch.Tensor
    tokens_per_expert_E: torch.Tensor

    @property
    def num_dropped(self) -> torch.Tensor:
        """Number of (token, expert) assignments dropped by capacity, a 0-d int64 tensor."""
        return (~self.keep_TK).sum()


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Largest number of assignments one expert takes from a rank's ``num_tokens`` tokens."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def capacity_keep_mask(
    topk_ids_TK: torch.Tensor, topk_scores_TK: torch.Tensor, num_experts: int, capacity: int
) -> torch.Tensor:
    """Keep, per expert, the ``capacity`` assignments with the highest score; drop the rest.

    Ties are broken by position (earlier token, then earlier k, wins) so the result is deterministic.

    Returns:
        keep_TK: bool tensor, True for kept assignments.
    """
    flat_ids = topk_ids_TK.reshape(-1)
    flat_scores = topk_scores_TK.reshape(-1).detach()
    n = flat_ids.numel()
    if n == 0:
        return torch.ones_like(topk_ids_TK, dtype=torch.bool)
    # Step 1: order assignments by score, best first (stable, so ties keep their original order) ...
    order = torch.sort(flat_scores, descending=True, stable=True).indices
    # Step 2: ... then group them by expert, keeping that order inside each expert.
    order = order[torch.sort(flat_ids[order], stable=True).indices]
    sorted_ids = flat_ids[order]
    # Step 3: the rank of each assignment inside its expert's group decides whether it fits.
    counts = count_per_expert(sorted_ids, num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(n, device=flat_ids.device) - starts[sorted_ids]
    keep = torch.empty(n, dtype=torch.bool, device=flat_ids.device)
    keep[order] = rank_in_expert < capacity
    return keep.view_as(topk_ids_TK)


def count_per_expert(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 [E]: how often each expert id appears in ``ids``. A scatter-add: unlike ``bincount`` it does not ask
    the device for the largest id, so it never waits on the host."""
    flat = ids.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
def top_indices(scores_TN: torch.Tensor, k: int) -> torch.Tensor:
    """int64 [T, k]: the k highest entries of each row, best first; equal scores go to the lower index (a stable
    sort, so the choice is the same on every device and run, which ``torch.topk`` does not promise)."""
    return torch.sort(scores_TN, dim=-1, descending=True, stable=True).indices[:, :k]


def select_experts(
    selection_TE: torch.Tensor,
    top_k: int,
    *,
    num_groups: int | None = None,
    group_topk: int | None = None,
    group_score_topk: int = 2,
) -> torch.Tensor:
    """The top-k experts of each token by ``selection_TE`` (scores + bias), optionally group-limited.

    Group-limited (``num_groups`` G): expert e is in group e // (E / G). Step 1: a group's score is the sum of its
    ``group_score_topk`` highest selection scores. Step 2: each token keeps its ``group_topk`` best groups (ties
    to the lower group). Step 3: the experts of the other groups are masked to -inf and the top-k is taken over
    the rest (ties to the lower expert). All on the device: sort, scatter and masked_fill, no host read.

    Returns:
        topk_ids_TK: int64 chosen experts, best first.
    """
    if num_groups is None:
        return top_indices(selection_TE, top_k)
    t, e = selection_TE.shape
    size = e // num_groups
    grouped_TGS = selection_TE.view(t, num_groups, size)
    group_scores_TG = grouped_TGS.topk(group_score_topk, dim=-1).values.sum(dim=-1)  # values only: ties are moot
    kept_TG = torch.zeros(t, num_groups, dtype=torch.bool, device=selection_TE.device)
    kept_TG.scatter_(1, top_indices(group_scores_TG, group_topk), True)
    masked_TE = selection_TE.masked_fill(~kept_TG.repeat_interleave(size, dim=1), float("-inf"))
    return top_indices(masked_TE, top_k)


def route(
    x_TH: torch.Tensor,
    weight_EH: torch.Tensor,
    expert_bias_E: torch.Tensor,
    config: RouterConfig,
    router_bias_E: torch.Tensor | None = None,
) -> RoutingResult:
    """Route tokens to their top-k experts (the steps in the module docstring).

    Args:
        x_TH: tokens, any float dtype.
        weight_EH: router weight.
        expert_bias_E: float32 selection bias (0 = plain top-k).
        config: scoring, grouping, top-k, normalisation, scaling and capacity settings.
        router_bias_E: the learned bias of the router linear (``router_bias``), or None.
    """
    dtype = torch.float64 if config.router_dtype == "float64" else torch.float32
    # Autocast would run the linear in bf16 whatever the inputs' dtype: switch it off for the router.
    with torch.autocast(device_type=x_TH.device.type, enabled=False):
        logits_TE = torch.nn.functional.linear(
            x_TH.to(dtype), weight_EH.to(dtype), None if router_bias_E is None else router_bias_E.to(dtype)
        )
    if config.score_function == "softmax":
        scores_TE = torch.softmax(logits_TE, dim=-1)
    else:
        scores_TE = torch.sigmoid(logits_TE)
    topk_ids_TK = select_experts(scores_TE.detach() + expert_bias_E, config.top_k, num_groups=config.num_groups,
                                 group_topk=config.group_topk, group_score_topk=config.group_score_topk)
    topk_scores_TK = scores_TE.gather(1, topk_ids_TK)
    if config.normalize_topk:
        topk_weights_TK = topk_scores_TK / (topk_scores_TK.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        topk_weights_TK = topk_scores_TK
    if config.routed_scaling_factor != 1.0:
        topk_weights_TK = topk_weights_TK * config.routed_scaling_factor
    topk_weights_TK = topk_weights_TK.float()  # combine weights are float32 (float64 routing included)
    tokens_per_expert_E = count_per_expert(topk_ids_TK, config.num_experts)
    if config.capacity_factor is None:
        keep_TK = torch.ones_like(topk_ids_TK, dtype=torch.bool)
    else:
        capacity = expert_capacity(x_TH.shape[0], config.num_experts, config.top_k, config.capacity_factor)
        keep_TK = capacity_keep_mask(topk_ids_TK, topk_scores_TK, config.num_experts, capacity)
        topk_weights_TK = topk_weights_TK * keep_TK
    return RoutingResult(
        logits_TE=logits_TE,
        scores_TE=scores_TE,
        topk_ids_TK=topk_ids_TK,
        topk_weights_TK=topk_weights_TK,
        keep_TK=keep_TK,
        tokens_per_expert_E=tokens_per_expert_E,
    )


class Router(nn.Module):
    """Holds ``weight`` [E, H], with ``router_bias`` the learned ``bias`` [E] of the linear (else None), and the
    selection bias buffer ``expert_bias`` [E] (float32, zero at start).

    The weight is replicated on every rank (each rank routes its own tokens); it starts from a seeded
    initialisation so all ranks agree without a broadcast.
    """

    def __init__(self, config: RouterConfig, hidden_size: int, *, init_std: float = 0.02, init_seed: int = 0):
        super().__init__()
        self.config = config
        gen = torch.Generator().manual_seed(init_seed)
        self.weight = nn.Parameter(torch.randn(config.num_experts, hidden_size, generator=gen) * init_std)
        # Drawn after the weight from the same generator: the weight is the same with and without a bias.
        self.bias = nn.Parameter(torch.randn(config.num_experts, generator=gen) * init_std) if config.router_bias else None
        self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # ``model.half()``/``.to(bfloat16)`` (and engines that cast whole models) would round the bias to 8 bits
        # of mantissa, so small bias steps would vanish: keep it in float32, as Megatron does for its expert_bias.
        super()._apply(fn, recurse)
        if self.expert_bias.dtype != torch.float32:
            self.expert_bias = self.expert_bias.float()
        return self

    def forward(self, x_TH: torch.Tensor) -> RoutingResult:
        return route(x_TH, self.weight, self.expert_bias, self.config, self.bias)
