"""Stand-in for Megatron's core attention on CPU (the stock ones allocate on CUDA): ``scaled_dot_product_attention``.

Shape legend:
    S  sequence length      B  micro-batch size      N  attention heads of this TP rank      D  head dimension
    G  query groups (key/value heads) of this TP rank

Megatron's local ``DotProductAttention`` takes its score buffer from ``parallel_state.get_global_memory_buffer()``,
which allocates on ``torch.cuda.current_device()``; Transformer Engine's needs CUDA too. This module has the same
constructor and ``forward`` signature (Megatron's ``CoreAttention`` protocol), so a spec can put it in
``SelfAttentionSubmodules.core_attention`` and the rest of Megatron's attention (QKV projection, rotary embedding,
output projection, tensor parallelism) stays stock. Use it on CPU; on GPUs keep the stock attention.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class TorchSDPAttention(MegatronModule):
    """Core attention with torch's SDPA. Arguments as Megatron's ``DotProductAttention``."""

    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise NotImplementedError(f"context_parallel_size={config.context_parallel_size}: TorchSDPAttention needs 1")
        if config.softmax_type != "vanilla":
            raise NotImplementedError(f"softmax_type={config.softmax_type!r}: TorchSDPAttention supports 'vanilla'")
        if config.window_size is not None:
            raise NotImplementedError(f"window_size={config.window_size!r}: TorchSDPAttention has no sliding window")
        if pg_collection is not None:
            tp = pg_collection.tp.size()
        else:
            tp = parallel_state.get_tensor_model_parallel_world_size()
        self.attn_mask_type = attn_mask_type
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        self.hidden_per_partition = config.kv_channels * self.heads
        # Megatron's query-key layer scaling divides the scale by the layer number and multiplies the scores back
        # inside its softmax: the same attention in exact arithmetic, so only the plain scale is used here.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        """query [S, B, N, D], key/value [S, B, G, D], attention_mask [B, 1, S, S] bool (True = masked out) or
        None -> context [S, B, N*D]."""
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("TorchSDPAttention supports neither packed sequences nor an attention bias")
        if self.heads > self.groups:  # grouped-query attention: repeat each key/value head for its queries
            key = key.repeat_interleave(self.heads // self.groups, dim=2)
            value = value.repeat_interleave(self.heads // self.groups, dim=2)
        q_BNSD, k_BNSD, v_BNSD = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        mask = None if attention_mask is None else ~attention_mask  # SDPA: True = may attend
        causal = mask is None and mask_type == AttnMaskType.causal and query.shape[0] > 1
        out_BNSD = F.scaled_dot_product_attention(
            q_BNSD, k_BNSD, v_BNSD, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout_p if self.training else 0.0, scale=self.softmax_scale,
        )
        s, b = query.shape[0], query.shape[1]
        return out_BNSD.permute(2, 0, 1, 3).reshape(s, b, self.hidden_per_partition)
