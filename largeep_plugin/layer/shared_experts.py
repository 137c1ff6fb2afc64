"""The shared expert: a dense MLP every token goes through on its own rank (DeepSeek-V2/V3, Qwen2-MoE).

Shape legend:
    T  tokens of this rank      H  hidden size      F  shared ffn hidden size (``shared_ffn_hidden_size``)

    y_TH = routed experts' combine + shared_expert(x_TH) [* sigmoid(x_TH @ shared_expert_gate.weight.T)]

Several shared experts (DeepSeek's ``n_shared_experts``) are one MLP of their summed hidden size: the sum of the
outputs of MLPs is the MLP of the concatenated hidden units. Parameter names on the layer:
``shared_expert.fc1.weight`` ([F, H], or [2F, H] gate rows first for the GLUs: the routed experts' layout),
``shared_expert.fc2.weight`` [H, F] (``.bias`` with ``linear_bias``) and, with ``shared_expert_gate``,
``shared_expert_gate.weight`` [1, H] (Qwen2-MoE's sigmoid gate).

Unlike routed experts the shared expert is dense: replicated on every rank, data-parallel, its gradients averaged
like the router's (no ``allreduce = False``). It needs no communication, so the layer runs it while the
dispatch all-to-all is in flight (a ``overlap.SideJob``; see ``token_exchange.TokenExchange``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import ExpertConfig, LargeEPConfig
from .experts import ExpertMLP

# The expert id of the shared expert's seeded initialisation: a stream of its own (routed experts are 0..E-1).
SHARED_EXPERT_ID = -1


class SharedExpertMLP(ExpertMLP):
    """The shared expert's MLP: an ``ExpertMLP`` of the shared size whose parameters are dense."""

    expert_parallel = False

    def __init__(self, config: ExpertConfig, *, init_seed: int = 0):
        super().__init__(config, expert_id=SHARED_EXPERT_ID, init_seed=init_seed)


def shared_gate_weight(config: LargeEPConfig) -> torch.Tensor:
    """The seeded initial ``shared_expert_gate.weight`` [1, H]."""
    gen = torch.Generator().manual_seed(config.init_seed * 1_000_003 + 104_729)
    return torch.randn(1, config.hidden_size, generator=gen) * config.init_std


class SharedExpertGate(nn.Linear):
    """``shared_expert_gate``: ``forward(x_TH) -> sigmoid(x_TH @ weight.T)`` [T, 1], weight [1, H], no bias."""

    def __init__(self, config: LargeEPConfig):
        super().__init__(config.hidden_size, 1, bias=False)
        with torch.no_grad():
            self.weight.copy_(shared_gate_weight(config))

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.sigmoid(super().forward(x_TH))


def build_shared_expert(config: LargeEPConfig) -> tuple[SharedExpertMLP | None, SharedExpertGate | None]:
    """The shared expert and its gate of ``config`` (None where not configured)."""
    shared_config = config.shared_expert_config
    if shared_config is None:
        return None, None
    gate = SharedExpertGate(config) if config.shared_expert_gate else None
    return SharedExpertMLP(shared_config, init_seed=config.init_seed), gate


def shared_expert_output(expert: nn.Module, gate: nn.Module | None, x_TH: torch.Tensor) -> torch.Tensor:
    """The shared expert's contribution to ``y_TH`` (gated when there is a gate)."""
    out_TH = expert(x_TH)
    return out_TH if gate is None else out_TH * gate(x_TH)
