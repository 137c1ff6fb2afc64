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


def steer_pairs(model: nn.Module) -> nn.Module:
    """Every block's router, in place, the same in every process: experts 0 and 2 like one direction of the hidden
    state, 1 and 3 the opposite one, so tokens choose the pairs (0, 2) and (1, 3): across the nodes when experts
    0-1 and 2-3 share one (a co-activation worth a move)."""
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "experts") and hasattr(module, "gate"):
                w = module.gate.weight
                w.mul_(0.1)
                for e, sign in ((0, 1.0), (2, 1.0), (1, -1.0), (3, -1.0)):
                    w[e] += sign * 3.0 * direction / direction.norm()
    return model


def worst_difference(a: tuple[list, list[dict]], b: tuple[list, list[dict]]) -> dict[str, float]:
    """Largest relative difference of two runs, each (per-step losses, every rank's ``{logical name: (value,
    exp_avg, exp_avg_sq)}``): of the losses and of each kind of tensor, over every rank's share; ``{"names": inf}``
    when the runs hold different tensors."""
    want = {k: v for part in a[1] for k, v in part.items()}
    got = {k: v for part in b[1] for k, v in part.items()}
    if sorted(want) != sorted(got):
        return {"names": float("inf")}
    worst = {"loss": max(abs(x - y) / abs(x) for x, y in zip(a[0], b[0]))}
    for i, what in enumerate(("param", "exp_avg", "exp_avg_sq")):
        worst[what] = max(float((want[k][i] - got[k][i]).abs().max() / want[k][i].abs().max().clamp_min(1e-30))
                          for k in want if len(want[k]) > i)
    return worst


def dense_and_experts(model: nn.Module) -> dict:
    """A converted model's parameters on this rank: ``{"dense": {name: tensor}, "experts": {(block name, expert id):
    ExpertMLP state}}`` (what ``param_errors`` compares)."""
    from largeep_plugin.integrations.hf.block import LargeEPHFBlock
    from largeep_plugin.layer.grads import is_expert_param

    experts = {}
    for name, block in model.named_modules():
        if isinstance(block, LargeEPHFBlock):
            for expert_id, module in block.moe.local_experts():
                experts[(name, expert_id)] = {k: v.detach().clone() for k, v in module.state_dict().items()}
    dense = {n: p.detach().clone() for n, p in model.named_parameters() if not is_expert_param(p)}
    return {"dense": dense, "experts": experts}


def param_errors(ref: nn.Module, got: dict) -> dict[str, float]:
    """Largest |converted - unconverted| over the dense parameters (routers included, read back into the Hugging
    Face names) and the experts of ``got`` (``dense_and_experts``)."""
    from largeep_plugin.integrations.hf.families import family_of
    from largeep_plugin.integrations.hf.weights import dense_sources, expert_from_hf

    ref_params = dict(ref.named_parameters())
    family = next(family_of(m) for m in ref.modules() if family_of(m) is not None)
    dense = 0.0
    for name, value in got["dense"].items():
        if ".moe." in name:
            block, ours = name.split(".moe.")
            want = torch.cat([ref_params[f"{block}.{t}"].detach() for t in dense_sources(family)[ours]])
        else:
            want = ref_params[name].detach()
        dense = max(dense, float((value - want).abs().max()))
    expert = 0.0
    for (block, expert_id), state in got["experts"].items():
        hf = ref.get_submodule(block)
        want = expert_from_hf(family, lambda n, e: hf.get_parameter(n).detach()[e], expert_id)
        expert = max(expert, max(float((state[k] - w).abs().max()) for k, w in want.items()))
    return {"dense": dense, "experts": expert}


def reference_aux(router_logits: tuple[torch.Tensor, ...], coeff: float, copies: int = 1,
                  reduce=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The plugin's switch loss (``aux_loss_coeff``) written from its formula for a softmax top-2 router, summed over
    the layers: coeff * E * sum_e f_e P_e, with f the fraction of the top-2 assignments that went to e over the EP
    group's tokens and P the mean softmax score of e over the tokens at hand.

    Two ways to use it: on one process holding every rank's tokens (``copies`` data-parallel copies of the EP group,
    rank-major rows: the mean of the ranks' losses, each rank holding as many tokens, is the mean over the copies of
    the loss of each copy's tokens); or on each rank of a data-parallel run of the unconverted model, ``reduce``
    summing the counts over the ranks (``torch.distributed.all_reduce``)."""
    total = torch.zeros(())
    for logits in router_logits:
        for part in logits.float().chunk(copies):
            scores = part.softmax(-1)
            counts = torch.nn.functional.one_hot(scores.topk(2, dim=-1).indices, scores.shape[-1]).sum((0, 1))
            if reduce is not None:
                reduce(counts)
            f = counts.float() / counts.sum()
            total = total + coeff * scores.shape[-1] * (f * scores.mean(0)).sum() / copies
    return total
