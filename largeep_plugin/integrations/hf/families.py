"""The one registry of Hugging Face MoE blocks that ``convert_model`` replaces, detected by module class.

A ``Family`` says how to read a block: which ``LargeEPConfig`` fields it defines and where its weights live. The
checkpoint names are relative to the block (``gate.weight``, ``experts.gate_up_proj``...), so the same table
serves a live block (``convert_model``) and a safetensors file (``from_pretrained``, ``save_pretrained``).

Weight layouts (transformers 5.x): router ``gate.weight`` [E, H]; experts fused as ``experts.gate_up_proj``
[E, 2F, H] (gate rows first, our SwiGLU ``fc1`` layout) and ``experts.down_proj`` [E, H, F] (our ``fc2``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

# Activations the experts may use: our "swiglu" is silu(gate) * up.
_SILU = ("silu", "swish")


@dataclass(frozen=True)
class Family:
    """One supported block class.

    Fields:
        name: shown in errors and docs.
        module: the transformers module that defines ``block_class``.
        block_class: the MoE block's class name.
        config_of: (block, the model's hidden_act) -> the model-defining ``LargeEPConfig`` fields (shapes, routing,
            shared expert).
        shared_prefix: the shared expert's name in the block (an MLP with gate_proj/up_proj/down_proj), or None.
        shared_gate: the sigmoid gate of the shared expert (``Linear(H, 1)``), or None.
        selection_bias: the router's selection-only bias (DeepSeek's ``gate.e_score_correction_bias``), or None.
        disk_block: the block's name in checkpoints on disk when it differs from the module's (Mixtral's
            ``block_sparse_moe``: transformers 5 renames it on load and back on save).
        router: the router's attribute name in the block (gpt-oss: ``router``); its class is what transformers
            records the router logits from.
        router_bias: the router has a learned bias ``<router>.bias`` [E] (gpt-oss).
        interleaved: gpt-oss's expert layout: ``experts.gate_up_proj`` [E, H, 2F] with gate and up in alternate
            columns, ``experts.down_proj`` [E, F, H], biases ``experts.gate_up_proj_bias`` [E, 2F] and
            ``experts.down_proj_bias`` [E, H].
        returns_scores: the block returns ``(hidden_states, router_scores [T, K])`` (gpt-oss), not the tensor alone.
        disk_experts: the per-expert tensors of checkpoints on disk, ``experts.<e>.<name>.weight`` for gate, up and
            down (transformers 5 fuses them on load and splits them again on save).
    """

    name: str
    module: str
    block_class: str
    config_of: Callable[[nn.Module, str], dict[str, Any]]
    shared_prefix: str | None = None
    shared_gate: str | None = None
    selection_bias: str | None = None
    router: str = "gate"
    router_bias: bool = False
    interleaved: bool = False
    returns_scores: bool = False
    disk_block: str | None = None
    disk_experts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    def resolve(self) -> type | None:
        """The block class, or None when this transformers has no such model."""
        try:
            return getattr(importlib.import_module(self.module), self.block_class, None)
        except ImportError:
            return None


def _experts_shape(block: nn.Module) -> dict[str, Any]:
    num_experts, two_f, hidden = block.experts.gate_up_proj.shape
    return dict(num_experts=num_experts, ffn_hidden_size=two_f // 2, hidden_size=hidden, activation="swiglu")


def _check_silu(block: nn.Module, act: str) -> None:
    if act not in _SILU:
        raise NotImplementedError(f"{type(block).__name__}: hidden_act={act!r}; only SiLU experts (SwiGLU) convert")


def _softmax_topk(block: nn.Module, act: str, normalize: bool) -> dict[str, Any]:
    _check_silu(block, act)
    return dict(_experts_shape(block), top_k=block.gate.top_k, score_function="softmax", normalize_topk=normalize)


def _mixtral(block: nn.Module, act: str) -> dict[str, Any]:
    if block.jitter_noise > 0:
        raise NotImplementedError(f"MixtralSparseMoeBlock: router_jitter_noise={block.jitter_noise} is not supported")
    return _softmax_topk(block, act, True)


def _qwen3(block: nn.Module, act: str) -> dict[str, Any]:
    return _softmax_topk(block, act, bool(block.gate.norm_topk_prob))


def _qwen2(block: nn.Module, act: str) -> dict[str, Any]:
    fields = _softmax_topk(block, act, bool(block.gate.norm_topk_prob))
    return dict(fields, shared_ffn_hidden_size=block.shared_expert.down_proj.in_features, shared_expert_gate=True)


def _deepseek_v3(block: nn.Module, act: str) -> dict[str, Any]:
    _check_silu(block, act)
    gate = block.gate
    # A group's score is the sum of its two best selection scores (DeepseekV3TopkRouter: .topk(2)); one group = none.
    groups = {}
    if gate.num_group > 1:
        groups = dict(num_groups=gate.num_group, group_topk=gate.topk_group, group_score_topk=2)
    return dict(_experts_shape(block), top_k=gate.top_k, score_function="sigmoid",
                normalize_topk=bool(gate.norm_topk_prob),
                routed_scaling_factor=float(gate.routed_scaling_factor),
                shared_ffn_hidden_size=block.shared_experts.down_proj.in_features, **groups)


def _gpt_oss(block: nn.Module, act: str) -> dict[str, Any]:
    # gpt-oss: softmax over the top-k logits = the top-k of the softmax, renormalised; its own clamped SwiGLU.
    experts = block.experts
    num_experts, hidden, two_f = experts.gate_up_proj.shape
    return dict(num_experts=num_experts, hidden_size=hidden, ffn_hidden_size=two_f // 2, top_k=block.router.top_k,
                score_function="softmax", normalize_topk=True, router_bias=True, linear_bias=True,
                activation="swiglu_oai", swiglu_limit=float(experts.limit), swiglu_alpha=float(experts.alpha))


_MODELS = "transformers.models"
FAMILIES: tuple[Family, ...] = (
    Family("Mixtral", f"{_MODELS}.mixtral.modeling_mixtral", "MixtralSparseMoeBlock", _mixtral,
           disk_block="block_sparse_moe", disk_experts=("w1", "w3", "w2")),
    Family("Qwen3-MoE", f"{_MODELS}.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock", _qwen3),
    Family("Qwen2-MoE", f"{_MODELS}.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeSparseMoeBlock", _qwen2,
           shared_prefix="shared_expert", shared_gate="shared_expert_gate"),
    Family("DeepSeek-V3", f"{_MODELS}.deepseek_v3.modeling_deepseek_v3", "DeepseekV3MoE", _deepseek_v3,
           shared_prefix="shared_experts", selection_bias="gate.e_score_correction_bias"),
    Family("OLMoE", f"{_MODELS}.olmoe.modeling_olmoe", "OlmoeSparseMoeBlock", _qwen3),
    Family("gpt-oss", f"{_MODELS}.gpt_oss.modeling_gpt_oss", "GptOssMLP", _gpt_oss, router="router",
           router_bias=True, interleaved=True, returns_scores=True),
)


def family_of(module: nn.Module) -> Family | None:
    """The family whose block class ``module`` is exactly (a subclass may change the forward: not ours to run)."""
    for family in FAMILIES:
        if family.resolve() is type(module):
            return family
    return None


def moe_parts(module: nn.Module) -> str | None:
    """What makes ``module`` look like an MoE block by any of the structures transformers uses (None: nothing).

    ``experts`` (a submodule: Mixtral, Qwen, DeepSeek, Switch...), ``input_linear`` with ``output_linear``
    (JetMoE's parallel experts), ``router`` (a submodule: gpt-oss, JetMoE, Switch), or ``gate`` beside several
    expert weights (stacked ``[E, ...]`` parameters of 3 or more dimensions, or a list of modules). A dense MLP has
    none of these (its gate is ``gate_proj``; Qwen2-MoE's shared-expert gate is ``shared_expert_gate``)."""
    children = dict(module.named_children())
    if isinstance(children.get("experts"), nn.Module):
        return "an 'experts' submodule"
    if "input_linear" in children and "output_linear" in children:
        return "'input_linear' and 'output_linear' experts"
    if "router" in children:
        return "a 'router' submodule"
    if "gate" in children:
        stacked = [n for n, p in module.named_parameters(recurse=False) if p.dim() >= 3]
        lists = [n for n, c in children.items() if isinstance(c, (nn.ModuleList, nn.ModuleDict)) and len(c) > 1]
        if stacked or lists:
            return f"a 'gate' beside expert weights {sorted(stacked + lists)}"
    return None


def supported_names() -> list[str]:
    return [f"{f.name} ({f.block_class})" for f in FAMILIES]
