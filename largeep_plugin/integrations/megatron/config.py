"""Translate a Megatron-Core ``TransformerConfig`` into the plugin's ``LargeEPConfig``, once, with clear errors.

The MoE settings a Megatron user already wrote (experts, top-k, score function, group-limited routing, top-k
scaling, capacity, losses, activation, shared experts, router dtype) are read from the ``TransformerConfig``; the plugin-only settings (``bias_update_rate``, ``init_seed``,
``check_inputs``, ``overlap_chunks``, ``dispatch``, dynamic replicas, moves: ``PLUGIN_FIELDS``) come from ``overrides``, a mapping of ``LargeEPConfig`` field
names (the ``large_ep`` section of a JSON/YAML file, or the spec helpers' ``large_ep=`` argument).

Errors:
    * ``ValueError`` names the field and the value: a Megatron config without experts, an unknown override key,
      an override that contradicts what the Megatron config says.
    * ``NotImplementedError`` names the Megatron field and value the large-EP layer does not support (expert tensor
      parallelism, device-limited routing, latent MoE, FP8 experts, ...), so nothing is silently ignored.

Megatron field -> ``LargeEPConfig`` field (besides the obvious ones):
    moe_router_num_groups / moe_router_group_topk   num_groups / group_topk, group_score_topk = top_k // group_topk
                                                    (Megatron's group score); softmax needs moe_router_pre_softmax
                                                    (Megatron scores groups on the logits otherwise)
    moe_router_topk_scaling_factor                  routed_scaling_factor (None: 1.0)
    moe_router_load_balancing_type + moe_aux_loss_coeff   aux_loss_coeff / seq_aux_loss_coeff /
                                                    global_aux_loss_coeff (a type or a list of types with a list of
                                                    coefficients)
    moe_shared_expert_intermediate_size / moe_shared_expert_gate   shared_ffn_hidden_size / shared_expert_gate (the
                                                    module is Megatron's SharedExpertMLP; with
                                                    moe_shared_expert_overlap it runs during the dispatch all-to-all)
    moe_router_dtype None / "fp32" / "fp64"         router_dtype float32 / float32 / float64
    add_bias_linear                                 linear_bias (experts) and router_bias (Megatron's router linear
                                                    has a bias then)
    gated_linear_unit + quick_gelu + glu_linear_offset=1 + activation_func_clamp_value   swiglu_oai (gpt-oss)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch.nn.functional as F

from largeep_plugin.layer.config import LargeEPConfig

# LargeEPConfig fields that only the plugin knows about: free to set through overrides.
PLUGIN_FIELDS = ("bias_update_rate", "init_seed", "check_inputs", "overlap_chunks", "dispatch", "grouped_gemm",
                 "dynamic_replicas", "rebalance_every", "rebalance_decay", "rebalance_margin", "replace_every",
                 "replace_margin")

# LargeEPConfig fields that come from the Megatron config, with the Megatron field to change instead.
MEGATRON_SOURCES = {
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "moe_ffn_hidden_size",
    "num_experts": "num_moe_experts",
    "top_k": "moe_router_topk",
    "activation": "gated_linear_unit / activation_func",
    "score_function": "moe_router_score_function",
    "normalize_topk": "moe_router_pre_softmax (softmax) / moe_router_topk (sigmoid)",
    "num_groups": "moe_router_num_groups",
    "group_topk": "moe_router_group_topk",
    "group_score_topk": "moe_router_topk // moe_router_group_topk",
    "routed_scaling_factor": "moe_router_topk_scaling_factor",
    "router_dtype": "moe_router_dtype",
    "capacity_factor": "moe_expert_capacity_factor",
    "aux_loss_coeff": "moe_aux_loss_coeff (moe_router_load_balancing_type 'aux_loss')",
    "seq_aux_loss_coeff": "moe_aux_loss_coeff (moe_router_load_balancing_type 'seq_aux_loss')",
    "global_aux_loss_coeff": "moe_aux_loss_coeff (moe_router_load_balancing_type 'global_aux_loss')",
    "z_loss_coeff": "moe_z_loss_coeff",
    "linear_bias": "add_bias_linear",
    "router_bias": "add_bias_linear",
    "shared_ffn_hidden_size": "moe_shared_expert_intermediate_size",
    "shared_expert_gate": "moe_shared_expert_gate",
    "swiglu_limit": "activation_func_clamp_value",
    "init_std": "init_method_std",
}

# The balancing losses Megatron names in moe_router_load_balancing_type, and the LargeEPConfig coefficient of each.
_BALANCING = {"aux_loss": "aux_loss_coeff", "seq_aux_loss": "seq_aux_loss_coeff",
              "global_aux_loss": "global_aux_loss_coeff"}

# Megatron fields whose non-default values the large-EP layer does not implement: (field, allowed values, why).
_UNSUPPORTED: tuple[tuple[str, tuple[Any, ...], str], ...] = (
    ("context_parallel_size", (1,), "context parallelism is not wired into the large-EP layer"),
    ("moe_router_topk_limited_devices", (None,), "device-limited routing is not implemented (use "
     "moe_router_num_groups / moe_router_group_topk: group-limited routing)"),
    ("moe_router_dtype", (None, "fp32", "fp64"), "the router runs in float32 or float64"),
    ("moe_router_force_load_balancing", (False,), "random benchmark routing is not implemented"),
    ("moe_enable_routing_replay", (False,), "routing replay is not implemented"),
    ("moe_input_jitter_eps", (None,), "input jitter is not implemented"),
    ("moe_token_drop_policy", ("probs",), "only the 'probs' drop policy (keep the highest scores) is implemented"),
    ("moe_pad_expert_input_to_capacity", (False,), "padding expert inputs to capacity is not implemented"),
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
    coeffs = _balancing_coeffs(config)
    if coeffs["seq_aux_loss_coeff"] > 0 and config.sequence_parallel and config.tensor_model_parallel_size > 1:
        raise NotImplementedError(
            "moe_router_load_balancing_type='seq_aux_loss' with sequence_parallel=True and "
            f"tensor_model_parallel_size={config.tensor_model_parallel_size}: a sequence is then split over the TP "
            "ranks, whose per-sequence counts the large-EP router does not gather"
        )
    _groups(config)
    if config.moe_shared_expert_overlap and getattr(config, "overlap_moe_expert_parallel_comm", False):
        raise NotImplementedError(
            "moe_shared_expert_overlap=True with overlap_moe_expert_parallel_comm=True: Megatron's fine-grained EP "
            "overlap schedules the shared expert itself; set moe_shared_expert_overlap=False"
        )
    _activation(config)


def _balancing_coeffs(config: Any) -> dict[str, float]:
    """The coefficient of each balancing loss from moe_router_load_balancing_type and moe_aux_loss_coeff."""
    types, coeffs = config.moe_router_load_balancing_type, config.moe_aux_loss_coeff
    if isinstance(types, str):
        types, coeffs = [types], [coeffs]
    if not isinstance(coeffs, (list, tuple)) or len(coeffs) != len(types):
        raise ValueError(f"moe_aux_loss_coeff={config.moe_aux_loss_coeff!r} must give one coefficient per type in "
                         f"moe_router_load_balancing_type={config.moe_router_load_balancing_type!r}")
    out = {name: 0.0 for name in _BALANCING.values()}
    for kind, coeff in zip(types, coeffs):
        if kind == "none":
            continue
        if kind not in _BALANCING:
            raise NotImplementedError(
                f"moe_router_load_balancing_type={kind!r} is not supported by the large-EP layer: use 'aux_loss' "
                "(switch loss over the EP group's global counts), 'seq_aux_loss', 'global_aux_loss' or 'none'; the "
                "selection bias balances without a loss"
            )
        out[_BALANCING[kind]] = float(coeff)
    return out


def _groups(config: Any) -> dict[str, Any]:
    """num_groups, group_topk and group_score_topk (Megatron: top_k // group_topk) of group-limited routing."""
    groups, group_topk = config.moe_router_num_groups, config.moe_router_group_topk
    if groups is None and group_topk is None:
        return {}
    if groups is None or group_topk is None:
        raise ValueError(f"moe_router_num_groups={groups!r} and moe_router_group_topk={group_topk!r}: "
                         "group-limited routing needs both")
    if config.moe_router_score_function == "softmax" and not config.moe_router_pre_softmax:
        raise NotImplementedError(
            "moe_router_num_groups with moe_router_score_function='softmax' and moe_router_pre_softmax=False: "
            "Megatron then scores the groups on the logits, the large-EP router on the probabilities; set "
            "moe_router_pre_softmax=True (DeepSeek-V2) or use sigmoid scores (DeepSeek-V3)"
        )
    score_topk = config.moe_router_topk // group_topk
    if score_topk < 1:
        raise ValueError(f"moe_router_topk={config.moe_router_topk} < moe_router_group_topk={group_topk}: Megatron "
                         "scores a group by its top (moe_router_topk // moe_router_group_topk) experts, here 0")
    return dict(num_groups=groups, group_topk=group_topk, group_score_topk=score_topk)


def _activation(config: Any) -> str:
    offset = getattr(config, "glu_linear_offset", 0.0)
    clamp = getattr(config, "activation_func_clamp_value", None)
    if config.gated_linear_unit and config.activation_func is F.silu and offset == 0.0 and clamp is None:
        return "swiglu"
    if not config.gated_linear_unit and config.activation_func is F.gelu:
        return "gelu"
    if (config.gated_linear_unit and getattr(config.activation_func, "__name__", "") == "quick_gelu"
            and offset == 1.0 and clamp is not None):
        return "swiglu_oai"
    raise NotImplementedError(
        f"gated_linear_unit={config.gated_linear_unit} with activation_func={config.activation_func!r}, "
        f"glu_linear_offset={offset}, activation_func_clamp_value={clamp} is not supported by the large-EP layer: "
        "use gated_linear_unit=False with F.gelu (exact GELU), gated_linear_unit=True with F.silu (SwiGLU), or "
        "gated_linear_unit=True with quick_gelu, glu_linear_offset=1.0 and activation_func_clamp_value set (gpt-oss)"
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
        **_balancing_coeffs(config),
        z_loss_coeff=float(config.moe_z_loss_coeff or 0.0),
        linear_bias=bool(config.add_bias_linear),
        router_bias=bool(config.add_bias_linear),
        init_std=float(config.init_method_std),
        routed_scaling_factor=float(config.moe_router_topk_scaling_factor or 1.0),
        router_dtype="float64" if config.moe_router_dtype == "fp64" else "float32",
        shared_ffn_hidden_size=config.moe_shared_expert_intermediate_size,
        shared_expert_gate=bool(config.moe_shared_expert_gate) and config.moe_shared_expert_intermediate_size is not None,
        **_groups(config),
    )
    if derived["activation"] == "swiglu_oai":
        derived["swiglu_limit"] = float(config.activation_func_clamp_value)
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
