"""A small decoder-only MoE transformer for the demo, the benchmarks and the integration tests.

Shape legend:
    B  sequences in a batch     S  sequence length     H  hidden size     V  vocabulary size
    N  attention heads          D  head dimension (H / N)

Every layer is ``x + attn(norm(x))`` then ``x + moe(norm(x))``: causal self-attention through
``torch.nn.functional.scaled_dot_product_attention`` and an MoE block in place of the MLP. The MoE block is
*pluggable*: the model takes a factory ``moe_factory(layer_index) -> nn.Module`` whose module maps
``[B, S, H] -> [B, S, H]``. ``largeep_moe_factory`` builds the plugin's ``LargeEPMoE``; the stock DeepSpeed MoE
is wrapped the same way in ``largeep_plugin/integrations/`` (this file never imports DeepSpeed).

The non-expert weights (embeddings, attention, norms, head) are initialised from ``TinyMoEConfig.seed`` alone, so
every rank builds identical replicas without a broadcast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from largeep_plugin.layer.comm import ProcessGroup
from largeep_plugin.layer.config import LargeEPConfig
from largeep_plugin.layer.moe_layer import LargeEPMoE

NORMS = ("rmsnorm", "layernorm")

MoEFactory = Callable[[int], nn.Module]
"""``moe_factory(layer_index)`` returns the MoE block of that layer: ``[B, S, H] -> [B, S, H]``."""


@dataclass(frozen=True, kw_only=True)
class TinyMoEConfig:
    """Shape of the demo transformer.

    Args:
        vocab_size: V.
        hidden_size: H (a multiple of ``num_heads``).
        ffn_hidden_size: hidden size of each expert MLP.
        num_layers: transformer layers, each with one MoE block.
        num_heads: attention heads.
        seq_len: longest sequence (learned position embeddings).
        num_experts: experts per MoE block.
        top_k: experts per token.
        norm: ``"rmsnorm"`` or ``"layernorm"``.
        init_std: std of the normal initialisation of the linears and embeddings.
        seed: seed of the non-expert initialisation (the experts have their own seeded init).
    """

    vocab_size: int = 64
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    seq_len: int = 64
    num_experts: int = 16
    top_k: int = 2
    norm: str = "rmsnorm"
    init_std: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_heads", "seq_len",
                     "num_experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be a multiple of num_heads={self.num_heads}"
            )
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be <= num_experts={self.num_experts}")
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r} is not one of {list(NORMS)}")
        if not (math.isfinite(self.init_std) and self.init_std > 0):
            raise ValueError(f"init_std={self.init_std!r} must be a finite number > 0")


def _norm(config: TinyMoEConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.hidden_size, eps=1e-6)
    return nn.LayerNorm(config.hidden_size)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``[B, S, H] -> [B, S, H]``."""

    def __init__(self, config: TinyMoEConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        b, s, h = x_BSH.shape
        q, k, v = self.qkv(x_BSH).split(h, dim=-1)
        # [B, S, H] -> [B, N, S, D], the layout scaled_dot_product_attention expects.
        q_BNSD, k_BNSD, v_BNSD = (t.view(b, s, self.num_heads, h // self.num_heads).transpose(1, 2) for t in (q, k, v))
        y_BNSD = F.scaled_dot_product_attention(q_BNSD, k_BNSD, v_BNSD, is_causal=True)
        return self.proj(y_BNSD.transpose(1, 2).reshape(b, s, h))


class TransformerLayer(nn.Module):
    """Pre-norm layer: attention then the MoE block, each with a residual connection."""

    def __init__(self, config: TinyMoEConfig, moe: nn.Module):
        super().__init__()
        self.attn_norm = _norm(config)
        self.attn = CausalSelfAttention(config)
        self.moe_norm = _norm(config)
        self.moe = moe

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        x_BSH = x_BSH + self.attn(self.attn_norm(x_BSH))
        return x_BSH + self.moe(self.moe_norm(x_BSH))


class TinyMoETransformer(nn.Module):
    """``forward(tokens_BS) -> logits_BSV``; ``forward(tokens_BS, targets_BS)`` and ``loss(tokens_BS, targets_BS)``
    give the mean cross-entropy.

    Args:
        config: the shape.
        moe_factory: builds the MoE block of each layer (see ``MoEFactory``).
    """

    def __init__(self, config: TinyMoEConfig, moe_factory: MoEFactory):
        super().__init__()
        self.config = config
        # Seed the default generator only while building, so replicas agree and the caller's RNG is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.tok_emb = nn.Embedding(config.vocab_size, config.hidden_size)
            self.pos_emb = nn.Embedding(config.seq_len, config.hidden_size)
            self.layers = nn.ModuleList(TransformerLayer(config, moe_factory(i)) for i in range(config.num_layers))
            self.final_norm = _norm(config)
            self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self._init_non_expert(config)

    @torch.no_grad()
    def _init_non_expert(self, config: TinyMoEConfig) -> None:
        # GPT-2 style: small normal weights; the MoE blocks keep the initialisation their factory gave them.
        for module in (self.tok_emb, self.pos_emb, self.head, *(layer.attn for layer in self.layers)):
            for p in module.parameters():
                p.normal_(0.0, config.init_std)

    def forward(self, tokens_BS: torch.Tensor, targets_BS: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, S, V]``; with ``targets_BS``, the mean cross-entropy instead (what a DeepSpeed engine's
        forward should return)."""
        if targets_BS is not None:
            return self.loss(tokens_BS, targets_BS)
        b, s = tokens_BS.shape
        if s > self.config.seq_len:
            raise ValueError(f"sequence length {s} is longer than seq_len={self.config.seq_len}")
        pos_S = torch.arange(s, device=tokens_BS.device)
        x_BSH = self.tok_emb(tokens_BS) + self.pos_emb(pos_S)
        for layer in self.layers:
            x_BSH = layer(x_BSH)
        return self.head(self.final_norm(x_BSH))

    def loss(self, tokens_BS: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
        logits_BSV = self.forward(tokens_BS)
        return F.cross_entropy(logits_BSV.reshape(-1, logits_BSV.shape[-1]).float(), targets_BS.reshape(-1))

    def moe_blocks(self) -> list[nn.Module]:
        """The MoE block of every layer, in layer order."""
        return [layer.moe for layer in self.layers]


def large_ep_config(config: TinyMoEConfig, **overrides: object) -> LargeEPConfig:
    """The ``LargeEPConfig`` of the model's MoE blocks; ``overrides`` set any other field (e.g. capacity)."""
    base: dict[str, object] = dict(
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size,
        num_experts=config.num_experts,
        top_k=config.top_k,
        init_std=config.init_std,
    )
    base.update(overrides)
    return LargeEPConfig(**base)  # type: ignore[arg-type]


def largeep_moe_factory(moe_config: LargeEPConfig, ep_group: ProcessGroup | None = None) -> MoEFactory:
    """A factory of ``LargeEPMoE`` blocks; layer i is seeded with ``init_seed + i`` so layers differ."""

    def build(layer_index: int) -> nn.Module:
        return LargeEPMoE(moe_config.replace(init_seed=moe_config.init_seed + layer_index), ep_group)

    return build
