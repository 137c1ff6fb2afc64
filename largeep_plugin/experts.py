"""The expert: a plain dense MLP applied to a contiguous buffer of rows.

Shape legend:
    N  rows (tokens received by this expert)    H  hidden size    F  expert ffn hidden size

Parameter names (stable: checkpoints and the adapters rely on them):
    GELU:   fc1.weight [F, H], fc2.weight [H, F];            expert(x) = fc2(gelu(fc1(x)))   (exact GELU)
    SwiGLU: fc1.weight [2F, H] (rows 0..F-1 are the gate, rows F..2F-1 the up projection, Megatron's order),
            fc2.weight [H, F];                               expert(x) = fc2(silu(gate(x)) * up(x))
    With ``linear_bias`` the linears also have ``fc1.bias`` and ``fc2.bias``.

Expert parameters carry ``allreduce = False`` (the Megatron and DeepSpeed convention): they are not data-parallel
over the EP group, so a trainer's gradient all-reduce must skip them (see ``grads.py``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ExpertConfig


def expert_seed(init_seed: int, expert_id: int) -> int:
    """Seed of expert ``expert_id``'s initialisation; the same on every rank and in the dense reference."""
    return (init_seed * 1_000_003 + 7919 * (expert_id + 1)) % (2**63)


class ExpertMLP(nn.Module):
    """One expert. ``forward(rows_NH) -> rows_NH``; an empty input gives an empty output (no special case)."""

    def __init__(self, config: ExpertConfig, *, expert_id: int, init_seed: int = 0):
        super().__init__()
        self.config = config
        self.expert_id = expert_id
        h, f = config.hidden_size, config.ffn_hidden_size
        fc1_out = 2 * f if config.activation == "swiglu" else f
        self.fc1 = nn.Linear(h, fc1_out, bias=config.linear_bias)
        self.fc2 = nn.Linear(f, h, bias=config.linear_bias)
        self.reset_parameters(init_seed)
        for p in self.parameters():
            p.allreduce = False  # expert parameter: not reduced over the EP group

    @torch.no_grad()
    def reset_parameters(self, init_seed: int) -> None:
        gen = torch.Generator().manual_seed(expert_seed(init_seed, self.expert_id))
        for lin in (self.fc1, self.fc2):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * self.config.init_std)
            if lin.bias is not None:
                lin.bias.zero_()

    def forward(self, rows_NH: torch.Tensor) -> torch.Tensor:
        h = self.fc1(rows_NH)
        if self.config.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)  # exact (erf) GELU
        return self.fc2(h)
