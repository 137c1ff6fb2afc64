"""Tiny random-init Hugging Face MoE models for the Hugging Face tests (no download: built from configs).

``tiny_model(family, num_experts)`` gives the same weights in every process (seeded); routers get a larger
standard deviation than the default so no top-k choice sits on a near-tie, and DeepSeek's selection bias is
random, and so are gpt-oss's biases, so that their mapping matters.
"""
from __future__ import annotations

import torch
import torch.nn as nn

VOCAB = 64
COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
              num_experts_per_tok=2)


def tiny_config(family: str, num_experts: int):  # type: ignore[no-untyped-def]
    import transformers as tf

    if family == "mixtral":
        return tf.MixtralConfig(intermediate_size=64, num_local_experts=num_experts, **COMMON)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=24, num_experts=num_experts,
                                 norm_topk_prob=True, head_dim=8, **COMMON)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=24, num_experts=num_experts,
                                 shared_expert_intermediate_size=40, **COMMON)
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(intermediate_size=64, moe_intermediate_size=16, n_routed_experts=num_experts,
                                   n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=0,
                                   kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                   v_head_dim=8, **dict(COMMON, num_key_value_heads=4))
    if family == "olmoe":
        return tf.OlmoeConfig(intermediate_size=24, num_experts=num_experts, bos_token_id=None, eos_token_id=None,
                              pad_token_id=None, **COMMON)
    if family == "gpt_oss":
        return tf.GptOssConfig(intermediate_size=24, num_local_experts=num_experts, head_dim=8, **COMMON)
    raise ValueError(f"family={family!r}")


def tiny_model(family: str, num_experts: int, seed: int = 0) -> nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(family, num_experts)).float()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            gate = getattr(module, "gate", None) or getattr(module, "router", None)
            if hasattr(module, "experts") and gate is not None:
                gate.weight.copy_(torch.randn(gate.weight.shape, generator=gen) * 0.5)
                # Biases start at zero: random ones show that their mapping (and gpt-oss's interleaving) is right.
                for name, p in list(gate.named_parameters()) + list(module.experts.named_parameters()):
                    if name.endswith("bias"):
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
                if hasattr(gate, "e_score_correction_bias"):
                    gate.e_score_correction_bias.copy_(torch.randn(gate.weight.shape[0], generator=gen) * 0.1)
    return model


def tokens(batch: int = 2, seq: int = 8, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def skew_router(model: nn.Module, hot: tuple[int, ...] = (0, 1), boost: float = 2.0, seed: int = 5) -> nn.Module:
    """Make ``hot`` experts the favourites of every MoE block, in place, the same in every process: DeepSeek's
    selection bias goes up by ``boost``; other routers get ``boost`` added to those experts' logits for a typical
    token. For that, every token embedding gets one shared direction (so the blocks' inputs share it too), and the
    hot experts' router rows move along the mean input of their block, measured on a sample batch."""
    blocks = [m for m in model.modules() if hasattr(m, "experts") and (hasattr(m, "gate") or hasattr(m, "router"))]
    sample = tokens(4, 16, seed=seed)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        shared = torch.randn(embed.weight.shape[1], generator=torch.Generator().manual_seed(seed))
        embed.weight += shared / shared.norm() * 4 * embed.weight.norm(dim=1).mean()
    for block in blocks:
        gate = getattr(block, "gate", None) or getattr(block, "router")
        if hasattr(gate, "e_score_correction_bias"):
            with torch.no_grad():
                gate.e_score_correction_bias[list(hot)] += boost
            continue
        seen: list[torch.Tensor] = []
        handle = block.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
        with torch.no_grad():
            model(input_ids=sample)
        handle.remove()
        mean = seen[0].reshape(-1, seen[0].shape[-1]).mean(0)
        with torch.no_grad():
            gate.weight[list(hot)] += boost * mean / mean.square().sum()
    return model
