"""torchtitan's ``MoE.Config`` -> the ``LargeEPConfig`` of the layer that replaces it; what cannot map is refused.

torchtitan 0.3.0 (``torchtitan/models/common/moe.py``) -> ours:
    router.num_experts, router.top_k               -> num_experts, top_k
    router.score_func ("softmax" / "sigmoid")      -> score_function
    router.route_norm, router.route_scale          -> normalize_topk, routed_scaling_factor
    router.num_expert_groups, num_limited_groups   -> num_groups, group_topk (a group scores the sum of its two
                                                      best selection scores, torchtitan's ``topk(2).sum``)
    router.gate.bias                               -> router_bias
    routed_experts.inner_experts (GroupedExperts)  -> ffn_hidden_size = hidden_dim, activation "swiglu",
                                                      expert_compute_dtype "bfloat16" (its GEMMs cast to bf16)
    shared_experts (FeedForward, SwiGLU)           -> shared_ffn_hidden_size = w1.out_features
    load_balance_coeff                             -> bias_update_rate (None: 0, no selection bias)

Refused with an error naming the setting: another expert class (gpt-oss's ``GptOssGroupedExperts``), a
dispatcher other than torchtitan's standard all-to-all (DeepEP, HybridEP, MinimalAsyncEP: they bring their own
token movement and capacity), a gated or biased shared expert, ``_debug_force_load_balance``.
"""
from __future__ import annotations

from typing import Any

from torchtitan.models.common.feed_forward import FeedForward
from torchtitan.models.common.moe import GroupedExperts, MoE
from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher, LocalTokenDispatcher

from largeep_plugin.integrations.hf.convert import check_overrides
from largeep_plugin.layer.config import LargeEPConfig

WHO = "torchtitan large_ep override"
# The dispatchers whose token movement ours replaces one for one (no capacity, no buffers of their own).
_STANDARD_DISPATCHERS = (LocalTokenDispatcher.Config, AllToAllTokenDispatcher.Config)


def _refuse_unsupported(cfg: MoE.Config) -> None:
    inner = cfg.routed_experts.inner_experts
    if type(inner) is not GroupedExperts.Config:
        raise NotImplementedError(f"{WHO}: routed_experts.inner_experts is {type(inner).__qualname__}; only "
                                  "GroupedExperts.Config (SwiGLU experts: Qwen3-MoE, DeepSeek-V3, Llama 4) maps")
    dispatcher = cfg.routed_experts.token_dispatcher
    if type(dispatcher) not in _STANDARD_DISPATCHERS:
        raise NotImplementedError(f"{WHO}: routed_experts.token_dispatcher is {type(dispatcher).__qualname__}; the "
                                  "override replaces torchtitan's standard all-to-all only (moe_comm_backend="
                                  "'standard'), not DeepEP, HybridEP or MinimalAsyncEP")
    if cfg.router._debug_force_load_balance:
        raise NotImplementedError(f"{WHO}: router._debug_force_load_balance=True (round-robin routing) is not "
                                  "supported")
    if cfg.router.num_experts != inner.num_experts or cfg.num_experts != inner.num_experts:
        raise ValueError(f"{WHO}: num_experts={cfg.num_experts}, router.num_experts={cfg.router.num_experts} and "
                         f"routed_experts.inner_experts.num_experts={inner.num_experts} must be equal")
    shared = cfg.shared_experts
    if shared is not None:
        if type(shared) is not FeedForward.Config:
            raise NotImplementedError(f"{WHO}: shared_experts is {type(shared).__qualname__}; only a plain "
                                      "FeedForward.Config (SwiGLU w1/w2/w3, no gate) maps")
        biased = [name for name in ("w1", "w2", "w3") if getattr(shared, name).bias]
        if biased:
            raise NotImplementedError(f"{WHO}: shared_experts.{biased[0]}.bias=True; the shared expert has no biases")


def model_fields(cfg: MoE.Config) -> dict[str, Any]:
    """The ``LargeEPConfig`` fields that torchtitan's ``cfg`` defines (the module docstring's table)."""
    _refuse_unsupported(cfg)
    router, inner = cfg.router, cfg.routed_experts.inner_experts
    fields: dict[str, Any] = dict(
        hidden_size=inner.dim, ffn_hidden_size=inner.hidden_dim, num_experts=inner.num_experts, top_k=router.top_k,
        activation="swiglu", score_function=router.score_func, normalize_topk=bool(router.route_norm),
        routed_scaling_factor=float(router.route_scale), router_bias=bool(router.gate.bias),
    )
    if router.num_expert_groups is not None:
        fields.update(num_groups=router.num_expert_groups, group_topk=router.num_limited_groups, group_score_topk=2)
    if cfg.shared_experts is not None:
        fields["shared_ffn_hidden_size"] = cfg.shared_experts.w1.out_features
    return fields


def largeep_config(cfg: MoE.Config, overrides: dict[str, Any] | None = None) -> LargeEPConfig:
    """The ``LargeEPConfig`` of the layer that replaces torchtitan's ``cfg``.

    Args:
        cfg: torchtitan's ``MoE.Config`` of one layer.
        overrides: plugin-only ``LargeEPConfig`` fields (``overlap_chunks``, ``dispatch``, ``capacity_factor``,
            ``bias_update_rate``, ``aux_loss_coeff``...), as ``hf.convert_model`` takes them; a model-defining or
            unknown name is a ValueError naming it.
    """
    overrides = dict(overrides or {})
    check_overrides(overrides, WHO)
    plugin: dict[str, Any] = dict(bias_update_rate=float(cfg.load_balance_coeff or 0.0),
                                  expert_compute_dtype="bfloat16")
    plugin.update(overrides)
    return LargeEPConfig(**model_fields(cfg), **plugin)
