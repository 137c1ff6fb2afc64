"""Dense single-process MoE written from the formulas: the oracle of the tests.

Shape legend:
    T  tokens      H  hidden size      E  experts      K  top_k      G  routing groups      F  ffn hidden size

Nothing here is shared with the layer's math: routing (scores, selection bias, routing groups, top-k with ties to
the lower index, normalisation, scaling, capacity), the experts (GELU, SwiGLU, gpt-oss's clamped SwiGLU, biases),
the shared expert and its gate, and the balancing losses are written again, the obvious way (pairwise ranks
instead of sorts, loops over experts and assignments, plain matmuls). All E experts live in one process.

Only the *weights* come from the layer: at construction the reference reads, by name, the seeded initial
parameters of the layer's own modules (``Router``, ``ExpertMLP``, the shared expert), so expert e here starts from
exactly what expert e starts from on whichever rank holds it; ``load_layer_state`` reads a ``LargeEPMoE``
state dict instead (router, the experts a rank holds, the shared expert). ``shard_state(e)`` is what a rank
holding expert e should load.

Parameter names (the layer's): ``router.weight`` [E, H], ``router.bias`` [E] (``router_bias``), buffer
``router.expert_bias`` [E]; ``experts.<e>.fc1.weight`` [F or 2F, H], ``experts.<e>.fc2.weight`` [H, F] (and
``.bias`` with ``linear_bias``); ``shared_expert.fc1.weight``, ``shared_expert.fc2.weight``,
``shared_expert_gate.weight`` [1, H].

Capacity is decided per call over the tokens of that call, as the sharded layer decides it per rank: to compare
with an EP run under a capacity factor, call the reference on each rank's tokens separately. Likewise the
balancing losses of one call treat the call's tokens as the batch (the global-batch loss: as the global batch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn as nn

from .config import LargeEPConfig


class _Weights(nn.Module):
    """A holder of ``weight`` (and ``bias``) parameters: no forward, the formulas below use them."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())


class _MLPWeights(nn.Module):
    """``fc1`` and ``fc2`` of one expert (or of the shared expert)."""

    def __init__(self, state: Mapping[str, torch.Tensor]):
        super().__init__()
        self.fc1 = _Weights(state["fc1.weight"], state.get("fc1.bias"))
        self.fc2 = _Weights(state["fc2.weight"], state.get("fc2.bias"))


@dataclass(frozen=True)
class ReferenceRouting:
    """One routing of the reference: ``logits_TE``, ``scores_TE`` (router dtype), ``topk_ids_TK`` (best first),
    ``topk_weights_TK`` (float32, 0 where dropped), ``keep_TK`` (bool, False where capacity dropped)."""

    logits_TE: torch.Tensor
    scores_TE: torch.Tensor
    topk_ids_TK: torch.Tensor
    topk_weights_TK: torch.Tensor
    keep_TK: torch.Tensor


class _RefRouter(nn.Module):
    """``weight`` [E, H], ``bias`` [E] or None, buffer ``expert_bias`` [E]; ``forward(x_TH) -> ReferenceRouting``."""

    def __init__(self, config: LargeEPConfig, state: Mapping[str, torch.Tensor]):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(state["weight"].detach().clone())
        self.bias = None if state.get("bias") is None else nn.Parameter(state["bias"].detach().clone())
        self.register_buffer("expert_bias", state["expert_bias"].detach().clone().float())

    def forward(self, x_TH: torch.Tensor) -> ReferenceRouting:
        cfg = self.config
        dtype = torch.float64 if cfg.router_dtype == "float64" else torch.float32
        logits_TE = x_TH.to(dtype) @ self.weight.to(dtype).t()
        if self.bias is not None:
            logits_TE = logits_TE + self.bias.to(dtype)
        if cfg.score_function == "softmax":
            exp_TE = torch.exp(logits_TE - logits_TE.max(dim=-1, keepdim=True).values)
            scores_TE = exp_TE / exp_TE.sum(dim=-1, keepdim=True)
        else:
            scores_TE = 1.0 / (1.0 + torch.exp(-logits_TE))
        topk_ids_TK = self.choose(scores_TE.detach() + self.expert_bias)
        chosen_TK = scores_TE.gather(1, topk_ids_TK)
        weights_TK = chosen_TK / (chosen_TK.sum(dim=-1, keepdim=True) + 1e-20) if cfg.normalize_topk else chosen_TK
        weights_TK = weights_TK * cfg.routed_scaling_factor
        keep_TK = self._capacity_keep(topk_ids_TK, chosen_TK.detach())
        return ReferenceRouting(logits_TE, scores_TE, topk_ids_TK, (weights_TK * keep_TK).float(), keep_TK)

    def choose(self, selection_TE: torch.Tensor) -> torch.Tensor:
        """int64 [T, K]: the chosen experts, best first, by pairwise ranks (ties to the lower index), inside each
        token's ``group_topk`` best groups when ``num_groups`` is set."""
        cfg = self.config
        t, e = selection_TE.shape
        allowed_TE = torch.ones(t, e, dtype=torch.bool, device=selection_TE.device)
        if cfg.num_groups is not None:
            size = e // cfg.num_groups
            best_TGS = selection_TE.view(t, cfg.num_groups, size).sort(dim=-1, descending=True).values
            group_score_TG = best_TGS[:, :, : cfg.group_score_topk].sum(dim=-1)
            allowed_TE = (_rank(group_score_TG, torch.ones_like(group_score_TG, dtype=torch.bool)) < cfg.group_topk
                          ).repeat_interleave(size, dim=1)
        rank_TE = _rank(selection_TE, allowed_TE)
        # Expert with rank r goes to column r (ranks of allowed experts are 0, 1, 2, ...).
        ids_TK = torch.zeros(t, cfg.top_k, dtype=torch.int64, device=selection_TE.device)
        for r in range(cfg.top_k):
            ids_TK[:, r] = ((rank_TE == r) & allowed_TE).long().argmax(dim=1)
        return ids_TK

    def _capacity_keep(self, topk_ids_TK: torch.Tensor, chosen_TK: torch.Tensor) -> torch.Tensor:
        """bool [T, K]: per expert, the ceil(cf * T * K / E) assignments of highest score (earlier token, then
        earlier k, on ties); all True when dropless."""
        cfg = self.config
        keep = torch.ones_like(topk_ids_TK, dtype=torch.bool)
        if cfg.capacity_factor is None:
            return keep
        t, k = topk_ids_TK.shape
        capacity = math.ceil(cfg.capacity_factor * t * k / cfg.num_experts)
        ids, scores = topk_ids_TK.tolist(), chosen_TK.tolist()
        for e in range(cfg.num_experts):
            mine = sorted(((-scores[i][j], i, j) for i in range(t) for j in range(k) if ids[i][j] == e))
            for _, i, j in mine[capacity:]:
                keep[i, j] = False
        return keep


class DenseMoEReference(nn.Module):
    """``forward(x [..., H]) -> y [..., H]``; ``forward(x, return_aux=True) -> (y, aux)`` with ``aux`` the sum of
    the balancing losses and the z-loss, coefficients applied.

    Attributes: ``router`` (``weight``, ``bias``, ``expert_bias``; ``router(x_TH)`` gives the routing alone, a
    ``ReferenceRouting``), ``experts[e]`` (``fc1``, ``fc2``), ``shared_expert`` and ``shared_expert_gate`` (None
    without).
    """

    def __init__(self, config: LargeEPConfig):
        super().__init__()
        self.config = config
        # The layer's modules only lend their seeded initial weights, read by name; their math is not used.
        from .experts import ExpertMLP
        from .router import Router
        from .shared_experts import SharedExpertMLP, shared_gate_weight

        router = Router(config.router_config, config.hidden_size, init_std=config.init_std, init_seed=config.init_seed)
        self.router = _RefRouter(config, dict(router.state_dict()))
        self.experts = nn.ModuleList(
            _MLPWeights(dict(ExpertMLP(config.expert_config, expert_id=e, init_seed=config.init_seed).state_dict()))
            for e in range(config.num_experts)
        )
        self.shared_expert: _MLPWeights | None = None
        self.shared_expert_gate: _Weights | None = None
        if config.shared_expert_config is not None:
            shared = SharedExpertMLP(config.shared_expert_config, init_seed=config.init_seed)
            self.shared_expert = _MLPWeights(dict(shared.state_dict()))
            if config.shared_expert_gate:
                self.shared_expert_gate = _Weights(shared_gate_weight(config))

    # ---- weights ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def load_layer_state(self, state: Mapping[str, torch.Tensor], expert_ids: tuple[int, ...] | None = None) -> None:
        """Copy, by name, the weights of a ``LargeEPMoE`` state dict: the router, the shared expert, and the experts
        it holds (``expert.*`` for one expert ``expert_ids[0]``, ``experts.<slot>.*`` for ``expert_ids[slot]``)."""
        own = dict(self.named_parameters())
        own.update(self.named_buffers())
        for name, value in state.items():
            target = name
            if name.startswith("expert."):
                target = f"experts.{expert_ids[0]}.{name[len('expert.'):]}"
            elif name.startswith("experts."):
                slot, rest = name[len("experts."):].split(".", 1)
                target = f"experts.{expert_ids[int(slot)]}.{rest}"
            if target in own:
                own[target].copy_(value)

    def shard_state(self, expert_id: int) -> dict[str, torch.Tensor]:
        """State dict for a ``LargeEPMoE`` that holds ``expert_id`` (router, that expert, the shared expert)."""
        state = {f"router.{k}": v for k, v in self.router.state_dict().items()}
        state.update({f"expert.{k}": v for k, v in self.experts[expert_id].state_dict().items()})
        for name in ("shared_expert", "shared_expert_gate"):
            module = getattr(self, name)
            if module is not None:
                state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        return state

    # ---- forward ------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, return_aux: bool = False):
        cfg = self.config
        x_TH = x.reshape(-1, cfg.hidden_size)
        t = x_TH.shape[0]
        routing = self.router(x_TH)
        topk_ids_TK, keep_TK, weights_TK = routing.topk_ids_TK, routing.keep_TK, routing.topk_weights_TK

        y_TH = torch.zeros(t, cfg.hidden_size, dtype=torch.float32, device=x.device)
        for e, expert in enumerate(self.experts):
            hit_TK = (topk_ids_TK == e) & keep_TK
            tok = hit_TK.any(dim=1).nonzero().flatten()
            if tok.numel():
                w_N = (weights_TK * hit_TK)[tok].sum(dim=1)
                y_TH = y_TH.index_add(0, tok, self._mlp(expert, x_TH[tok]).float() * w_N.unsqueeze(1))
        y_TH = y_TH.to(x.dtype)
        if self.shared_expert is not None:
            shared_TH = self._mlp(self.shared_expert, x_TH)
            if self.shared_expert_gate is not None:
                shared_TH = shared_TH * torch.sigmoid(x_TH @ self.shared_expert_gate.weight.t())
            y_TH = y_TH + shared_TH
        y = y_TH.view(x.shape)
        if not return_aux:
            return y
        return y, self._losses(routing.logits_TE, routing.scores_TE, topk_ids_TK, x)

    def _mlp(self, w: _MLPWeights, x_NH: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        h = x_NH @ w.fc1.weight.t()
        if w.fc1.bias is not None:
            h = h + w.fc1.bias
        f = h.shape[-1] // 2
        if cfg.activation == "gelu":
            h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
        elif cfg.activation == "swiglu":
            gate, up = h[:, :f], h[:, f:]
            h = gate / (1.0 + torch.exp(-gate)) * up
        else:  # swiglu_oai (gpt-oss)
            gate = torch.clamp(h[:, :f], max=cfg.swiglu_limit)
            up = torch.clamp(h[:, f:], min=-cfg.swiglu_limit, max=cfg.swiglu_limit)
            h = (up + 1.0) * gate / (1.0 + torch.exp(-cfg.swiglu_alpha * gate))
        out = h @ w.fc2.weight.t()
        if w.fc2.bias is not None:
            out = out + w.fc2.bias
        return out

    def _losses(self, logits_TE: torch.Tensor, scores_TE: torch.Tensor, topk_ids_TK: torch.Tensor,
                x: torch.Tensor) -> torch.Tensor:
        """Switch, sequence-wise, global-batch (this call's tokens) and z-loss, coefficients applied."""
        cfg = self.config
        t, e = scores_TE.shape
        aux = torch.zeros((), dtype=torch.float32, device=x.device)
        if t == 0:
            return aux
        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True) if cfg.score_function == "sigmoid" else scores_TE
        onehot_TE = torch.zeros(t, e, dtype=probs_TE.dtype, device=x.device)
        for j in range(cfg.top_k):
            onehot_TE[torch.arange(t), topk_ids_TK[:, j]] += 1.0

        def switch(rows: slice) -> torch.Tensor:
            counts_E = onehot_TE[rows].sum(dim=0)
            return e * ((counts_E / counts_E.sum()) * probs_TE[rows].mean(dim=0)).sum()

        if cfg.aux_loss_coeff > 0 or cfg.global_aux_loss_coeff > 0:
            aux = aux + (cfg.aux_loss_coeff + cfg.global_aux_loss_coeff) * switch(slice(0, t))
        if cfg.seq_aux_loss_coeff > 0:
            seq_len = x.shape[-2] if x.dim() >= 3 else t
            per_seq = [switch(slice(s, s + seq_len)) for s in range(0, t, seq_len)]
            aux = aux + cfg.seq_aux_loss_coeff * torch.stack(per_seq).mean()
        if cfg.z_loss_coeff > 0:
            lse_T = logits_TE.max(dim=-1).values + torch.log(torch.exp(
                logits_TE - logits_TE.max(dim=-1, keepdim=True).values).sum(dim=-1))
            aux = aux + cfg.z_loss_coeff * (lse_T ** 2).mean()
        return aux.float()


def _rank(scores_TN: torch.Tensor, allowed_TN: torch.Tensor) -> torch.Tensor:
    """int64 [T, N]: the place of each entry among the allowed entries of its row when sorted best first, ties
    to the lower index: the number of allowed entries that beat it (pairwise comparison, no sort)."""
    s_i, s_j = scores_TN.unsqueeze(2), scores_TN.unsqueeze(1)
    n = scores_TN.shape[1]
    lower_j = torch.arange(n, device=scores_TN.device).view(1, 1, n) < torch.arange(n, device=scores_TN.device).view(1, n, 1)
    beats = ((s_j > s_i) | ((s_j == s_i) & lower_j)) & allowed_TN.unsqueeze(1)
    return beats.sum(dim=2)
