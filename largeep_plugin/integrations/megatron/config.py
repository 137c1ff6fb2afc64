"""Translate a Megatron-Core ``TransformerConfig`` into the plugin's ``LargeEPConfig``, once, with clear errors.

The MoE settings a Megatron user already wrote (experts, top-k, score function, capacity, losses, activation) are
read from the ``TransformerConfig``; the plugin-only settings (``bias_update_rate``, ``init_seed``,
``check_inputs``, ``overlap_chunks``, ``dispatch``) come from ``overrides``, a mapping of ``LargeEPConfig`` field
names (the ``large_ep`` section of a JSON/YAML file, or the spec helpers' ``large_ep=`` argument).

Errors:
    * ``ValueError`` names the field and the value: a Megatron config without experts, an unknown override key,
      an override that contradicts what the Megatron config says.
    * ``NotImplementedError`` names the Megatron field and value the large-EP layer does not support (expert tensor
      parallelism, grouped-limited routing, latent MoE, FP8 experts, ...), so nothing is silently ignored.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch.nn.functional as F

from largeep_plugin.layer.config import LargeEPConfig

# LargeEPConfig fields that only the plugin knows about: free to set through overrides.
PLUGIN_FIELDS = ("bias_update_rate", "init_seed", "check_inputs", "overlap_chunks", "dispatch")

# LargeEPConfig fields that come from the Megatron config, with the Megatron field to change instead.
MEGATRON_SOURCES = {
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "moe_ffn_hidden_size",
    "num_experts": "num_moe_experts",
    "top_k": "moe_router_topk",
    "activation": "gated_linear_unit / activation_func",
    "score_function": "moe_router_score_function",
    "normalize_topk": "moe_router_pre_softmax (softmax) / moe_router_topk (sigmoid)",
    "capacity_factor": "moe_expert_capacity_factor",
    "aux_loss_coeff": "moe_aux_loss_coeff",
    "z_loss_coeff": "moe_z_loss_coeff",
    "linear_bias": "add_bias_linear",
    "init_std": "init_method_std",
}

# Megatron fields whose non-default values the large-EP layer does not implement: (field, allowed values, why).
_UNSUPPORTED: tuple[tuple[str, tuple[Any, ...], str], ...] = (
    ("context_parallel_size", (1,), "context parallelism is not wired into the large-EP layer"),
    ("expert_tensor_parallel_size", (None, 1), "experts are not split with tensor parallelism (one expert per rank)"),
    ("moe_router_num_groups", (None,), "group-limited routing is not implemented"),
    ("moe_router_group_topk", (None,), "group-limited routing is not implemented"),
    ("moe_router_topk_limited_devices", (None,), "device-limited routing is not implemented"),
    ("moe_router_topk_scaling_factor", (None, 1, 1.0), "scaled top-k weights are not implemented"),
    ("moe_router_dtype", (None, "fp32"), "the router always runs in float32"),
    ("moe_router_force_load_balancing", (False,), "random benchmark routing is not implemented"),
    ("moe_enable_routing_replay", (False,), "routing replay is not implemented"),
    ("moe_input_jitter_eps", (None,), "input jitter is not implemented"),
    ("moe_token_drop_policy", ("probs",), "only the 'probs' drop policy (keep the highest scores) is implemented"),
    ("moe_pad_expert_input_to_capacity", (False,), "padding expert inputs to capacity is not implemented"),
    ("moe_shared_expert_overlap", (False,), "shared experts run outside the dispatcher (no overlap)"),
    ("moe_latent_size", (None,), "latent MoE projections are not implemented"),
    ("moe_apply_probs_on_input", (False,), "combine weights are applied on the expert output"),
    ("moe_token_dispatcher_type", ("allgather", "alltoall"), "'flex' selects DeepEP/HybridEP hooks; the large-EP "
     "layer brings its own dispatcher (leave 'alltoall')"),
    ("delay_wgrad_compute", (False,), "delayed weight gradients are not implemented"),
    ("fp8", (None,), "FP8 experts are not implemented"),
    ("fp4", (None,), "FP4 experts are not implemented"),
)


def check_megatron_config(config: Any) -> None:
    """Raise if ``config`` (a ``TransformerConfig``) asks for something the large-EP layer cannot do."""
    if getattr(config, "num_moe_experts", None) is None:
        raise ValueError("num_moe_experts=None: the large-EP layer is an MoE layer; set num_moe_experts")
    for field, allowed, why in _UNSUPPORTED:
        value = getattr(config, field, allowed[0])
        if value not in allowed:
            raise NotImplementedError(f"{field}={value!r} is not supported by the large-EP layer: {why}")
    balancing = config.moe_router_load_balancing_type
    if balancing not in ("aux_loss", "none"):
        raise NotImplementedError(
            f"moe_router_load_balancing_type={balancing!r} is not supported by the large-EP layer: use 'aux_loss' "
            "(switch loss over the EP group's global counts) or 'none'; the selection bias balances without a loss"
        )
    if not isinstance(config.moe_aux_loss_coeff, (int, float)):
        raise NotImplementedError(f"moe_aux_loss_coeff={config.moe_aux_loss_coeff!r}: one coefficient is supported")
    _activation(config)


def _activation(config: Any) -> str:
    if config.gated_linear_unit and config.activation_func is F.silu:
        return "swiglu"
    if not config.gated_linear_unit and config.activation_func is F.gelu:
        return "gelu"
    raise NotImplementedError(
        f"gated_linear_unit={config.gated_linear_unit} with activation_func={config.activation_func!r} is not "
        "supported by the large-EP layer: use gated_linear_unit=False with F.gelu (exact GELU), or "
        "gated_linear_unit=True with F.silu (SwiGLU)"
    )


def _normalize_topk(config: Any) -> bool:
    # Megatron's softmax routing renormalises over the chosen k unless the softmax is taken first
    # (moe_router_pre_softmax); its sigmoid routing renormalises whenever k > 1.
    if config.moe_router_score_function == "softmax":
        return not config.moe_router_pre_softmax
    return config.moe_router_topk > 1


def large_ep_config_from_megatron(config: Any, overrides: Mapping[str, Any] | None = None) -> LargeEPConfig:
    """Build the ``LargeEPConfig`` of the MoE layers of a Megatron model.

    Args:
        config: Megatron's ``TransformerConfig`` (``num_moe_experts`` set).
        overrides: ``LargeEPConfig`` fields. Plugin-only fields (``PLUGIN_FIELDS``) are taken as given; a field that
            the Megatron config defines (``MEGATRON_SOURCES``) may be repeated only with the same value.
    Returns:
        The validated config (``LargeEPConfig`` validates every field itself).
    """
    check_megatron_config(config)
    overrides = dict(overrides or {})
    valid = [f.name for f in dataclasses.fields(LargeEPConfig)]
    unknown = [k for k in overrides if k not in valid]
    if unknown:
        raise ValueError(f"unknown large_ep key(s) {unknown}; valid keys are {valid}")

    derived: dict[str, Any] = dict(
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.moe_ffn_hidden_size,
        num_experts=config.num_moe_experts,
        top_k=config.moe_router_topk,
        activation=_activation(config),
        score_function=config.moe_router_score_function,
        normalize_topk=_normalize_topk(config),
        capacity_factor=config.moe_expert_capacity_factor,
        aux_loss_coeff=float(config.moe_aux_loss_coeff) if config.moe_router_load_balancing_type == "aux_loss" else 0.0,
        z_loss_coeff=float(config.moe_z_loss_coeff or 0.0),
        linear_bias=bool(config.add_bias_linear),
        init_std=float(config.init_method_std),
    )
    for key, value in overrides.items():
        if key in derived and value != derived[key]:
            raise ValueError(
                f"large_ep key {key}={value!r} contradicts the Megatron config ({MEGATRON_SOURCES[key]} gives "
                f"{derived[key]!r}); set it in the Megatron config instead"
            )
    if config.moe_router_enable_expert_bias:
        # Megatron owns the bias update then (finalize_model_grads), with its own rate.
        rate = config.moe_router_bias_update_rate
        if "bias_update_rate" in overrides and overrides["bias_update_rate"] != rate:
            raise ValueError(
                f"large_ep key bias_update_rate={overrides['bias_update_rate']!r} contradicts "
                f"moe_router_bias_update_rate={rate!r} (moe_router_enable_expert_bias=True lets Megatron update the "
                "bias); set one of them"
            )
        derived["bias_update_rate"] = float(rate)
    fields = {**overrides, **derived}
    return LargeEPConfig(**fields)
