"""Megatron-Core's stock MoE layer beside ``LargeEPMoELayer`` on one GPU: the baseline of ``largeep gpu-check``.

Megatron's stock MoE does not run on CPU (its all-to-all dispatcher creates a CUDA stream): this needs CUDA.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch


def stock_vs_large_ep(device: torch.device, placement_of: Callable[[int], Any], tokens: int = 8192,
                      iters: int = 10) -> dict[str, float]:
    """Forward + backward tokens/s of Megatron's ``MoELayer`` (all-to-all dispatcher, ``SequentialMLP`` experts)
    and of ``LargeEPMoELayer`` with the same config at EP 1 (all experts on the one rank: ``placement_of(E)``)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from .layer import LargeEPMoELayer

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    model_parallel_cuda_manual_seed(0)
    cfg = TransformerConfig(num_layers=1, hidden_size=1024, num_attention_heads=8, ffn_hidden_size=4096,
                            moe_ffn_hidden_size=4096, num_moe_experts=8, moe_router_topk=2, bf16=True,
                            params_dtype=torch.bfloat16, moe_token_dispatcher_type="alltoall", gated_linear_unit=True,
                            activation_func=torch.nn.functional.silu, add_bias_linear=False)
    stock = MoELayer(cfg, MoESubmodules(experts=ModuleSpec(module=SequentialMLP, submodules=MLPSubmodules(
        linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)))).to(device)
    ours = LargeEPMoELayer(cfg, placement=placement_of(cfg.num_moe_experts)).to(device=device, dtype=torch.bfloat16)
    x = torch.randn(tokens, 1, cfg.hidden_size, device=device, dtype=torch.bfloat16, requires_grad=True)

    def rate(layer: torch.nn.Module) -> float:
        for _ in range(2):
            layer(x)[0].float().sum().backward()
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            layer(x)[0].float().sum().backward()
        torch.cuda.synchronize(device)
        return tokens * iters / (time.perf_counter() - t0)

    s, o = rate(stock), rate(ours)
    return {"stock_tokens_per_s": s, "large_ep_tokens_per_s": o, "large_ep_over_stock": o / s}
