"""``convert_model``: replace every supported Hugging Face MoE block of a model with a large-EP block, in place.

Which rank holds which expert:
    * ``placement`` given: as it says (``Placement.num_experts`` must equal the block's E).
    * E == EP size: expert e on rank e.
    * E > EP size: contiguous blocks of E / R experts per rank, only with ``allow_colocate=True`` (as the layer
      itself: one expert per rank is the design, colocation an explicit opt-in).
    * EP size 1 (torch.distributed not initialised, or a group of one): the one process holds every expert; that is
      the only possible layout, so it needs no opt-in.
    * E < EP size: replicas, planned by ``plan_placement`` on a one-node topology.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch.nn as nn

from largeep_plugin.layer.comm import ProcessGroup, group_size
from largeep_plugin.layer.config import LargeEPConfig
from largeep_plugin.layer.moe_layer import LargeEPMoE
from largeep_plugin.layer.process_groups import ExpertProcessGroups, layer_expert_groups
from largeep_plugin.placement.plan import Placement, plan_placement
from largeep_plugin.placement.topology import Topology

from .block import LargeEPHFBlock
from .families import Family, family_of, moe_parts, supported_names
from .generate import keep_ranks_together_in_generate
from .weights import Reader, load_block_weights

# LargeEPConfig fields that the checkpoint defines (shapes, routing, shared expert, initialisation): never overridden.
MODEL_FIELDS = frozenset({
    "hidden_size", "ffn_hidden_size", "num_experts", "top_k", "activation", "swiglu_limit", "swiglu_alpha",
    "score_function", "normalize_topk", "num_groups", "group_topk", "group_score_topk", "routed_scaling_factor",
    "router_bias", "linear_bias", "shared_ffn_hidden_size", "shared_expert_gate", "init_std", "init_seed",
})


def check_overrides(overrides: dict[str, Any], who: str = "convert_model") -> None:
    """ValueError naming an override that is not a plugin-only ``LargeEPConfig`` field (``who``: the caller, as the
    message names it)."""
    known = {f.name for f in dataclasses.fields(LargeEPConfig)}
    for name, value in overrides.items():
        if name not in known:
            raise ValueError(f"{who}: unknown override {name}={value!r}; plugin-only LargeEPConfig fields: "
                             f"{sorted(known - MODEL_FIELDS)}")
        if name in MODEL_FIELDS:
            raise ValueError(f"{who}: {name}={value!r} is defined by the model, not an override; "
                             f"plugin-only fields: {sorted(known - MODEL_FIELDS)}")


def placement_for(num_experts: int, ep_group: ProcessGroup | None, placement: Placement | None,
                  allow_colocate: bool) -> Placement | None:
    """The placement of one block's experts (module docstring); None means expert e on rank e."""
    ep_size = group_size(ep_group)
    if placement is not None:
        if placement.num_experts != num_experts:
            raise ValueError(f"placement.num_experts={placement.num_experts}, but the model's blocks have "
                             f"{num_experts} experts")
        return placement
    if num_experts == ep_size:
        return None
    topology = Topology.uniform(1, ep_size)
    if num_experts < ep_size:
        return plan_placement(num_experts, topology)
    if ep_size > 1 and not allow_colocate:
        raise ValueError(f"{num_experts} experts on EP size {ep_size}: more experts than ranks needs "
                         "allow_colocate=True (several experts per rank) or a placement")
    if num_experts % ep_size:
        raise NotImplementedError(f"{num_experts} experts on EP size {ep_size}: pass a placement when E is not a "
                                  "multiple of the EP size")
    per = num_experts // ep_size
    blocks = tuple(tuple(range(r * per, (r + 1) * per)) for r in range(ep_size))
    return Placement(topology=topology, num_experts=num_experts, rank_to_experts=blocks)


def _hidden_act(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "hidden_act", "silu"))


def _block_reader(block: nn.Module) -> Reader:
    state = block.state_dict()
    return lambda name, expert: state[name] if expert is None else state[name][expert]


def build_block(block: nn.Module, family: Family, hidden_act: str, ep_group: ProcessGroup | None,
                placement: Placement | None, allow_colocate: bool, overrides: dict[str, Any],
                read: Reader | None, expert_groups: ExpertProcessGroups | None = None,
                ranks_per_node: int | None = None) -> LargeEPHFBlock:
    """The large-EP block for ``block``; weights read with ``read`` (None: keep the fresh initialisation)."""
    config = LargeEPConfig(**family.config_of(block, hidden_act), **overrides)
    where = placement_for(config.num_experts, ep_group, placement, allow_colocate)
    router = getattr(block, family.router)
    like = router.weight
    moe = LargeEPMoE(config, ep_group, placement=where, expert_groups=expert_groups, ranks_per_node=ranks_per_node)
    moe.to(dtype=like.dtype, device=like.device if like.device.type != "meta" else None)
    if read is not None:
        load_block_weights(moe, family, read)
    return LargeEPHFBlock(moe, router, family)


def convert_model(model: nn.Module, ep_group: ProcessGroup | None = None, placement: Placement | None = None,
                  allow_colocate: bool = False, expert_groups: ExpertProcessGroups | None = None,
                  ranks_per_node: int | None = None, allow_no_moe: bool = False, **overrides: Any) -> nn.Module:
    """Replace every supported MoE block of ``model`` in place; returns ``model``.

    Args:
        model: a transformers model (``MixtralForCausalLM``...), weights loaded.
        ep_group: the expert-parallel group (None: the default group, or one process without torch.distributed).
        placement: which rank holds which expert (default: see the module docstring); the same for every block.
        allow_colocate: allow several experts per rank when the blocks have more experts than ranks.
        expert_groups: the groups expert gradients are summed over, for every block (see ``LargeEPMoE``; None: built
            once per conversion, shared by the blocks, when the world holds several copies of the EP group or
            experts have replicas). The DeepSpeed adapter passes DeepSpeed's expert-data-parallel groups.
        ranks_per_node: ranks of one node, consecutive in the EP group, for ``dispatch="hierarchical"`` (see
            ``LargeEPMoE``).
        allow_no_moe: a model with no block to convert (none of a registered family, none already converted) is
            returned unchanged instead of a ValueError.
        overrides: plugin-only ``LargeEPConfig`` fields (``bias_update_rate``, ``capacity_factor``,
            ``overlap_chunks``, ``dispatch``, ``aux_loss_coeff``...). A model-defining or unknown name: ValueError.
    Raises:
        NotImplementedError: a block that looks like MoE (``families.moe_parts``) of an unregistered class, or a
            block setting we cannot express.
        ValueError: nothing to convert, without ``allow_no_moe``.

    A converted model keeps every rank in its layers' all-to-alls until all ranks have finished ``generate``
    (``generate.py``).
    """
    check_overrides(overrides)
    return _convert(model, ep_group, placement, allow_colocate, overrides, load=True, expert_groups=expert_groups,
                    ranks_per_node=ranks_per_node, allow_no_moe=allow_no_moe)


def _blocks(module: nn.Module, prefix: str = "") -> list[tuple[nn.Module, str, nn.Module, Family | None]]:
    """(parent, name, block, family) of every registered block (family set) and every block already converted
    (family None) under ``module``, top down, not looking inside them; NotImplementedError at the first block
    that looks like MoE and is neither."""
    out: list[tuple[nn.Module, str, nn.Module, Family | None]] = []
    for name, child in module.named_children():
        where = f"{prefix}.{name}" if prefix else name
        family = None if isinstance(child, LargeEPHFBlock) else family_of(child)
        if family is not None or isinstance(child, LargeEPHFBlock):
            out.append((module, name, child, family))
            continue
        parts = moe_parts(child)
        if parts is not None:
            raise NotImplementedError(f"{where}: {type(child).__name__} looks like an MoE block ({parts}) but its "
                                      f"class is not supported; supported: {', '.join(supported_names())}")
        out += _blocks(child, where)
    return out


def _convert(model: nn.Module, ep_group: ProcessGroup | None, placement: Placement | None, allow_colocate: bool,
             overrides: dict[str, Any], load: bool, expert_groups: ExpertProcessGroups | None = None,
             ranks_per_node: int | None = None, allow_no_moe: bool = False) -> nn.Module:
    found = _blocks(model)
    if not found and not allow_no_moe:
        raise ValueError(f"convert_model: {type(model).__name__} has no MoE block to convert (supported: "
                         f"{', '.join(supported_names())}); pass allow_no_moe=True if that is expected")
    targets = [(parent, name, block, family) for parent, name, block, family in found if family is not None]
    hidden_act = _hidden_act(model)
    # Blocks with the same expert count share one layout: their expert groups are built once, not per block.
    shared: dict[int, ExpertProcessGroups | None] = {}
    for parent, name, block, family in targets:
        read = _block_reader(block) if load else None
        groups = expert_groups
        if groups is None:
            num_experts = int(family.config_of(block, hidden_act)["num_experts"])
            if num_experts not in shared:
                shared[num_experts] = layer_expert_groups(
                    placement_for(num_experts, ep_group, placement, allow_colocate), num_experts, ep_group)
            groups = shared[num_experts]
        setattr(parent, name, build_block(block, family, hidden_act, ep_group, placement, allow_colocate,
                                          overrides, read, groups, ranks_per_node))
        del block  # the Hugging Face experts go with it (the other ranks' experts are never kept)
    if found:
        keep_ranks_together_in_generate(model)
    return model
