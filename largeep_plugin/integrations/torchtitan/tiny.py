"""Tiny torchtitan models of two registry flavours, for the tests and the example: torchtitan's own builders
(``models/qwen3``, ``models/deepseek_v3``) at a few dozen hidden units.

    "qwen3"        Qwen3-MoE (registry "debugmodel_moe"): softmax scores, top-2 renormalised, no shared expert
    "deepseek_v3"  DeepSeek-V3 (routing of the registry's "671B"): sigmoid scores, group-limited (4 groups, 2 kept),
                   top-3 renormalised, route scale 2.5, one shared expert, a dense first layer

Both have 8 experts, 2 layers, and load_balance_coeff 1e-3 (torchtitan's default).
"""
from __future__ import annotations

import dataclasses

import spmd_types as spmd
from torchtitan.models.common import CosSinRoPE
from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.common.decoder import Decoder
from torchtitan.models.common.moe import MoE
from torchtitan.models.common.moe_sharding import set_moe_sharding_config

FLAVOURS = ("qwen3", "deepseek_v3")
DIM, MOE_HIDDEN, NUM_EXPERTS, VOCAB = 32, 24, 8, 64


def tiny_model_config(flavour: str, *, sdpa: bool = False) -> Decoder.Config:
    """The model config of ``flavour`` (module docstring). ``sdpa``: causal SDPA attention instead of torchtitan's
    FlexAttention, which has no backward on the CPU (its registry no longer offers SDPA for language models)."""
    if flavour == "qwen3":
        from torchtitan.models.qwen3 import _build_qwen3_moe_layers, model_registry
        cfg = model_registry("debugmodel_moe", attn_backend="flex").model
        cfg.layers = _build_qwen3_moe_layers(
            n_layers=2, dim=DIM, n_heads=2, n_kv_heads=1, head_dim=16, moe_hidden_dim=MOE_HIDDEN,
            num_experts=NUM_EXPERTS, top_k=2, attn_backend="flex", moe_comm_backend="standard",
            rope=CosSinRoPE.Config(dim=16, max_seq_len=64, theta=1e6))
    elif flavour == "deepseek_v3":
        from torchtitan.models.deepseek_v3 import _build_dsv3_layers, model_registry
        cfg = model_registry("debugmodel", attn_backend="flex").model
        rope = dataclasses.replace(cfg.layers[0].attention.rope, dim=8)
        cfg.layers = _build_dsv3_layers(
            n_layers=2, n_dense_layers=1, dim=DIM, n_heads=2, q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=8, v_head_dim=8, mscale=0.70, dense_hidden_dim=48, moe_hidden_dim=MOE_HIDDEN,
            num_experts=NUM_EXPERTS, num_shared_experts=1, router_top_k=3, router_score_func="sigmoid",
            router_num_expert_groups=4, router_num_limited_groups=2, router_route_scale=2.5, router_route_norm=True,
            attn_backend="flex", moe_comm_backend="standard", non_blocking_capacity_factor=None, rope=rope)
    else:
        raise ValueError(f"flavour={flavour!r} is not one of {list(FLAVOURS)}")
    cfg.dim, cfg.vocab_size = DIM, VOCAB
    cfg.norm = dataclasses.replace(cfg.norm, normalized_shape=DIM)
    cfg.tok_embeddings = dataclasses.replace(cfg.tok_embeddings, num_embeddings=VOCAB, embedding_dim=DIM)
    cfg.lm_head = dataclasses.replace(cfg.lm_head, in_features=DIM, out_features=VOCAB)
    if sdpa:
        for layer in cfg.layers:
            layer.attention.inner_attention = ScaledDotProductAttention.Config()
    return cfg


def set_ep_sharding(model_config: Decoder.Config) -> Decoder.Config:
    """The sharding configs torchtitan's ``update_from_config`` sets on the MoE layers for expert parallelism
    (tensor parallelism off), set without it: it imports torchtitan's trainer, and with it the ``datasets`` package
    (not installed here: its huggingface-hub < 2 pin conflicts with transformers >= 5.23)."""
    for moe in moe_configs(model_config):
        set_moe_sharding_config(moe, enable_ep=True, enable_sp=False, expert_param_layout={
            "w1_EFD": spmd.S(1), "w2_EDF": spmd.S(2), "w3_EFD": spmd.S(1)})
    return model_config


def moe_configs(model_config: Decoder.Config) -> list[MoE.Config]:
    """The MoE configs of the model's layers (the dense ones skipped)."""
    return [layer.moe for layer in model_config.layers if getattr(layer, "moe", None) is not None]
