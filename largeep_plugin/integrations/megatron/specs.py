"""Spec helpers: Megatron's stock GPT specs with the MoE ``mlp`` swapped for the large-EP layer.

    spec = get_gpt_layer_spec_with_large_ep(num_experts=16)                      # one layer (every layer MoE)
    block = get_gpt_decoder_block_spec_with_large_ep(config)                      # dense/MoE pattern, PP slice
    model = GPTModel(config=config, transformer_layer_spec=block, ...)

Everything but the MoE ``mlp`` stays stock (attention, norms, dense layers, shared experts). ``large_ep`` passes
plugin-only ``LargeEPConfig`` fields to every large-EP layer; ``placement`` a ``largeep_plugin.placement.plan`` plan;
``core_attention=TorchSDPAttention`` puts a CPU-capable attention in (Megatron's local attention allocates on CUDA).
The helpers build new spec objects and never modify Megatron's.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from .experts import LargeEPExperts
from .layer import LargeEPMoELayer
from .router import LargeEPRouter


def large_ep_mlp_spec(
    *, large_ep: Mapping[str, Any] | None = None, placement: Any = None, shared_experts: Any = None
) -> ModuleSpec:
    """The ``mlp`` spec of a large-EP layer (``shared_experts``: the stock shared-expert spec to keep, if any)."""
    params: dict[str, Any] = {}
    if large_ep:
        params["large_ep"] = dict(large_ep)
    if placement is not None:
        params["placement"] = placement
    return ModuleSpec(
        module=LargeEPMoELayer,
        params=params,
        submodules=MoESubmodules(experts=LargeEPExperts, router=LargeEPRouter, shared_experts=shared_experts),
    )


def _is_moe_mlp(mlp: Any) -> bool:
    module = getattr(mlp, "module", mlp)
    return isinstance(module, type) and issubclass(module, MoELayer)


def with_large_ep(
    layer_spec: ModuleSpec,
    *,
    large_ep: Mapping[str, Any] | None = None,
    placement: Any = None,
    core_attention: type | None = None,
) -> ModuleSpec:
    """A copy of a ``TransformerLayer`` spec whose MoE ``mlp`` (if it has one) is the large-EP layer and, when
    ``core_attention`` is given, whose self-attention uses it."""
    sub = layer_spec.submodules
    changes: dict[str, Any] = {}
    if _is_moe_mlp(sub.mlp):
        stock_sub = getattr(sub.mlp, "submodules", None)
        shared = getattr(stock_sub, "shared_experts", None)
        changes["mlp"] = large_ep_mlp_spec(large_ep=large_ep, placement=placement, shared_experts=shared)
    if core_attention is not None:
        attn = sub.self_attention
        attn_sub = getattr(attn, "submodules", None)
        if attn_sub is None or not hasattr(attn_sub, "core_attention"):
            raise ValueError(f"the layer spec's self_attention {attn!r} has no core_attention to replace")
        changes["self_attention"] = dataclasses.replace(
            attn, submodules=dataclasses.replace(attn_sub, core_attention=core_attention)
        )
    if not changes:
        return layer_spec
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(sub, **changes))


def get_gpt_layer_spec_with_large_ep(
    num_experts: int,
    *,
    large_ep: Mapping[str, Any] | None = None,
    placement: Any = None,
    core_attention: type | None = None,
    **local_spec_kwargs: Any,
) -> ModuleSpec:
    """Megatron's ``get_gpt_layer_local_spec(num_experts, ...)`` with the large-EP MoE layer.

    ``local_spec_kwargs`` go to ``get_gpt_layer_local_spec`` (``qk_layernorm``, ``normalization``, ...). For
    Transformer Engine layers, build the stock TE spec and pass it through ``with_large_ep``.
    """
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"num_experts={num_experts!r} must be an int >= 1")
    stock = get_gpt_layer_local_spec(num_experts=num_experts, **local_spec_kwargs)
    return with_large_ep(stock, large_ep=large_ep, placement=placement, core_attention=core_attention)


def get_gpt_decoder_block_spec_with_large_ep(
    config: Any,
    *,
    use_transformer_engine: bool = False,
    large_ep: Mapping[str, Any] | None = None,
    placement: Any = None,
    core_attention: type | None = None,
    **block_spec_kwargs: Any,
) -> Any:
    """Megatron's ``get_gpt_decoder_block_spec(config, use_transformer_engine, ...)`` (dense/MoE pattern from
    ``config.moe_layer_freq``, this pipeline stage's slice) with every MoE layer large-EP.

    ``block_spec_kwargs`` go to ``get_gpt_decoder_block_spec`` (``normalization``, ``qk_l2_norm``, ``vp_stage``,
    ``pp_rank``). Returns a ``TransformerBlockSubmodules``.
    """
    block = get_gpt_decoder_block_spec(config, use_transformer_engine, **block_spec_kwargs)
    layers = [
        with_large_ep(s, large_ep=large_ep, placement=placement, core_attention=core_attention)
        for s in block.layer_specs
    ]
    return dataclasses.replace(block, layer_specs=layers)
