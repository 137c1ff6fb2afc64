"""Hugging Face MoE models under ``initialize``: the blocks ``integrations/hf`` converts, made what DeepSpeed's
engine needs.

Shape legend:
    E  experts per block      R  ranks of one EP group (``ep_size``)      L  experts per rank (E / R)

The conversion is ``largeep_plugin.hf.convert_model`` (one family registry, one weight mapping), run on DeepSpeed's
EP group ``ep_size_<R>`` with the section's plugin-only settings as overrides. What the engine then needs depends on
the ZeRO stage, because DeepSpeed 0.19.8 knows two kinds of MoE module and each works under other stages:

* **Stages 0, 1 and 2.** The engine reduces expert gradients over the expert-data-parallel group (and writes one
  checkpoint file per expert) only when the model holds a ``deepspeed.moe.layer.MoE`` (``engine.has_moe_layers``;
  otherwise its reduction would average the experts over the whole data-parallel group, and its checkpoint would
  keep rank 0's experts only). Each converted block becomes a ``LargeEPDeepSpeedHFBlock``: the same object, whose
  class is now also a ``MoE``; the Hugging Face forward is unchanged. It carries what the engine reads
  (``num_experts``, ``ep_size``, ``num_local_experts`` = L, ``expert_group_name``), checks the engine's group in
  ``set_deepspeed_parallelism``, and its state dict uses the stock layout (``convert.use_stock_names``): expert
  slot l is ``deepspeed_moe.experts.deepspeed_experts.<l>.*``, which the engine files as expert ``R_rank * L + l``
  (the expert id: colocated experts are contiguous blocks; a placement's permutation is named by
  ``placement.hook_checkpoint_names``).
* **Stage 3.** The engine refuses native MoE modules under ZeRO 3 (``_validate_zero3_moe_compatibility``) and
  partitions every other parameter over the whole data-parallel group, which would mix different experts' shards.
  AutoEP's layers get through by what their expert parameters carry, and so do ours: ``ds_zero_placement_family
  = "autoep_expert"``, ``ds_zero_partition_group_name = "ep_size_<R>"`` and, as AutoEP's
  ``_partition_autoep_zero3_experts`` sets it, ``ds_zero_partition_process_group`` = the expert-data-parallel
  group. ZeRO 3 then partitions each expert over the ranks that hold it, reduce-scatters its gradient there and
  divides it by the data-parallel size (``stage3._gradient_averaging_world_size``, as the engine does for stage
  0-2 experts), and sums the gradient norm over the EP group. The block stays a plain ``LargeEPHFBlock`` (the
  engine sees no MoE module), so checkpoints go through the ZeRO shards, one file per rank.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch.nn as nn
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups

from largeep_plugin.layer.comm import ProcessGroup, group_size
from largeep_plugin.layer.grads import REPLICA_GROUP_ATTR
from largeep_plugin.layer.moe_layer import LargeEPMoE, moe_layers
from largeep_plugin.layer.process_groups import build_replica_groups, ep_partition, ep_ranks_of
from largeep_plugin.placement.plan import Placement
from largeep_plugin.integrations.hf.block import LargeEPHFBlock
from largeep_plugin.integrations.hf.convert import MODEL_FIELDS, convert_model, placement_for
from largeep_plugin.integrations.hf.families import Family, family_of
from largeep_plugin.integrations.hf.weights import tensor_sources
from largeep_plugin.integrations.section.config import SECTION, LargeEPSection, layer_fields, section_key
from .convert import check_engine_group, tag_expert_params, use_stock_names
from .placement import deepspeed_expert_groups

__all__ = ["LargeEPDeepSpeedHFBlock", "hf_moe_blocks", "convert_hf_blocks"]


class LargeEPDeepSpeedHFBlock(LargeEPHFBlock, MoE):
    """A converted Hugging Face block that DeepSpeed's engine also treats as a ``deepspeed.moe.layer.MoE`` (ZeRO
    stages 0-2). Made from a ``LargeEPHFBlock`` in place by ``as_deepspeed_moe`` (never constructed: the block's
    router-logits hook is bound to the object); the Hugging Face forward is ``LargeEPHFBlock``'s."""

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine. The EP group was made before conversion; check the engine sees the same one."""
        check_engine_group(self.expert_group_name, self.moe)


def as_deepspeed_moe(block: LargeEPHFBlock, group_name: str) -> LargeEPDeepSpeedHFBlock:
    """Turn ``block`` into a ``LargeEPDeepSpeedHFBlock`` in place (the module docstring, stages 0-2)."""
    moe = block.moe
    block.__class__ = LargeEPDeepSpeedHFBlock
    # What the engine and its checkpoint code read off an MoE module (MoE.__init__ would build a stock gate).
    block.use_residual = False
    block.enable_expert_tensor_parallelism = False
    block.ep_size = moe.ep_size
    block.expert_group_name = group_name
    block.num_experts = moe.config.num_experts
    block.num_local_experts = moe.num_home_slots
    use_stock_names(block, "moe", moe)
    return block  # type: ignore[return-value]


def tag_for_zero3(layer: LargeEPMoE, group_name: str) -> None:
    """Stage 3: partition each expert over its expert-data-parallel group, as AutoEP's expert parameters are.

    ZeRO 3 gathers a module's parameters again for its backward from a hook on the tensors its forward returns;
    the router returns a ``RoutingResult`` (not a tensor, tuple or dict), which ZeRO 3 does not look into, so the
    router's parameters are registered as external parameters of the layer, whose output is a tensor."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    edp = groups._get_expert_data_parallel_group(group_name)
    for _, expert in layer.local_experts():
        for p in expert.parameters():
            p.ds_zero_placement_family = "autoep_expert"
            p.ds_zero_partition_group_name = group_name
            p.ds_zero_partition_process_group = edp
    for p in layer.router.parameters():
        register_external_parameter(layer, p)
    if layer.clones is not None:
        # The clones' gradients return to the home parameters through an autograd node of the layer's forward
        # (layer/clones.py): ZeRO 3 must have them whole there, as it has the router's.
        for _, expert in layer.local_experts():
            for p in expert.parameters():
                register_external_parameter(layer, p)


def hf_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module, Family]]:
    """The model's unconverted Hugging Face MoE blocks of a registered family: (name, block, family)."""
    out = []
    for name, module in model.named_modules():
        family = family_of(module)
        if family is not None:
            out.append((name, module, family))
    return out


def hf_routing(model: nn.Module) -> tuple[int, int] | None:
    """(experts per block, top k) of the model's Hugging Face MoE blocks; None without any. One value for all
    blocks, or NotImplementedError: one EP layout and one placement serve every block."""
    act = str(getattr(getattr(model, "config", None), "hidden_act", "silu"))
    shapes = set()
    for _, block, family in hf_moe_blocks(model):
        fields = family.config_of(block, act)
        shapes.add((fields["num_experts"], fields["top_k"]))
    if len(shapes) > 1:
        raise NotImplementedError(f"the Hugging Face MoE blocks differ in (experts, top k): {sorted(shapes)}; one "
                                  "expert-parallel layout serves them all")
    return shapes.pop() if shapes else None


def _overrides(section: LargeEPSection, written: Mapping[str, Any] | None, family: Family) -> dict[str, Any]:
    """The section's plugin-only ``LargeEPConfig`` fields; a model-defining one the user wrote is a ValueError."""
    for name, value in layer_fields(section, written=written or {}).items():
        if name in MODEL_FIELDS:
            raise ValueError(f"{section_key(name)}={value!r}: the Hugging Face model ({family.name}) defines "
                             f"{name}; remove it from the {SECTION} section")
    return {k: v for k, v in layer_fields(section).items() if k not in MODEL_FIELDS}


# grads.REPLICA_GROUP_ATTR, on a replicated expert's parameters: the ranks of its own EP group holding the same
# expert, over which its gradient is summed before the engine's step reduces it (``initialize``'s step wrapper).


def _layout(num_experts: int, section: LargeEPSection, ep_group: ProcessGroup, placement: Placement | None,
            given: bool, replicas_ok: str | None) -> Placement | None:
    """Which EP rank holds which experts: a placement passed to ``initialize`` (any layout: colocated, replicated),
    the section's placement (one expert per rank), expert e on rank e (None), or (``allow_colocate``) contiguous
    blocks of L experts. ``replicas_ok`` is None when the config allows replicas, else why not."""
    ep = group_size(ep_group)
    where = f"{SECTION}.ep_size={ep}"
    if given and placement is not None:
        if placement.num_experts != num_experts or placement.world_size != ep:
            raise ValueError(f"placement has {placement.num_experts} experts on {placement.world_size} ranks, but the "
                             f"model's blocks have {num_experts} experts on {where}")
        if max(placement.num_replicas) > 1 and replicas_ok is not None:
            raise NotImplementedError(f"a placement with replicas under DeepSpeed needs {replicas_ok}")
        return placement
    if num_experts < ep:
        raise NotImplementedError(f"{num_experts} experts per block on {where} would replicate experts: give "
                                  f"ep_size={num_experts} (or a divisor of it with {SECTION}.allow_colocate), or "
                                  "pass initialize a placement with replicas")
    if num_experts > ep:
        if placement is not None:
            raise NotImplementedError(f"{SECTION}.placement with {num_experts} experts on {where}: a placement "
                                      f"file places one expert per rank; give ep_size={num_experts}")
        if not section.allow_colocate and ep > 1:  # EP 1: holding every expert is the only layout there is
            raise ValueError(f"{num_experts} experts per block on {where}: several experts per rank needs "
                             f"\"{SECTION}\": {{\"allow_colocate\": true}} (or ep_size={num_experts})")
    return placement_for(num_experts, ep_group, placement, section.allow_colocate)


def _tag_replica_groups(model: nn.Module, layout: Placement, ep_group: ProcessGroup) -> bool:
    """Tag every replicated expert parameter with its replica group (``REPLICA_GROUP_ATTR``; collective: builds
    the groups, once for every block). Returns whether the layout has replicas."""
    if max(layout.num_replicas) == 1:
        return False
    by_expert = build_replica_groups(layout.rank_to_experts, ep_partition(ep_ranks_of(ep_group)))
    for _, layer in moe_layers(model):
        for expert_id, module in layer.local_experts():
            for p in module.parameters():
                setattr(p, REPLICA_GROUP_ATTR, by_expert.get(expert_id))
    return True


def convert_hf_blocks(model: nn.Module, section: LargeEPSection, written: Mapping[str, Any] | None,
                      ep_group: ProcessGroup, placement: Placement | None, zero_stage: int,
                      ranks_per_node: int | None = None, placement_given: bool = False,
                      managed_accumulation: bool = True) -> tuple[dict[int, list[nn.Parameter]], bool]:
    """Convert every Hugging Face MoE block of ``model`` in place for the engine (module docstring).

    Args:
        section: the resolved section (``ep_size`` an integer); ``written``: its raw value (which keys the user
            wrote: a model-defining one, ``top_k`` or ``score_function``, is a ValueError).
        ep_group: DeepSpeed's group ``ep_size_<R>`` of this rank; placement: the section's, or None.
        zero_stage: the config's ZeRO stage (3: the stage-3 tags instead of the ``MoE`` class).
        ranks_per_node: ranks of one node for ``overlap.dispatch = "hierarchical"`` (``resolve_ranks_per_node``).
        placement_given: ``placement`` was passed to ``initialize`` (any layout, replicas included), not planned
            from the section's files (one expert per rank).
        managed_accumulation: the config's ``managed_gradient_accumulation`` (replicas need it false).
    Returns:
        ``{id(Hugging Face parameter): [the converted parameters read from it]}``, for the optimizer groups, and
        whether experts have replicas (their gradients to be summed before each engine step: ``REPLICA_GROUP_ATTR``).
    """
    blocks = hf_moe_blocks(model)
    num_experts, _ = hf_routing(model)  # type: ignore[misc]
    overrides = _overrides(section, written, blocks[0][2])
    replicas_ok = None
    if zero_stage > 1 or managed_accumulation:
        # ZeRO 2 moves each gradient into its own buffers during backward, even unmanaged: the sum would miss them.
        replicas_ok = ('"managed_gradient_accumulation": false and ZeRO stage 0 or 1 (the engine then reduces '
                       'gradients in step(), after the replicas have summed theirs); the config has stage '
                       f'{zero_stage}, managed_gradient_accumulation {str(managed_accumulation).lower()}')
    layout = _layout(num_experts, section, ep_group, placement, placement_given, replicas_ok)
    group_name = section.group_name
    old = {name: dict(block.named_parameters()) for name, block, _ in blocks}
    expert_groups = deepspeed_expert_groups(layout or Placement.identity(num_experts), ep_group, group_name)
    convert_model(model, ep_group, placement=layout, allow_colocate=section.allow_colocate,
                  expert_groups=expert_groups, ranks_per_node=ranks_per_node, **overrides)
    mapping: dict[int, list[nn.Parameter]] = {}
    for name, sources in old.items():
        block = model.get_submodule(name)
        new = dict(block.moe.named_parameters())
        for ours, theirs in tensor_sources(block.moe, block.family).items():
            for source in theirs:
                if ours in new and source in sources:
                    mapping.setdefault(id(sources[source]), []).append(new[ours])
        tag_expert_params(block.moe, group_name)
        if zero_stage >= 3:
            tag_for_zero3(block.moe, group_name)
        else:
            as_deepspeed_moe(block, group_name)
    replicated = layout is not None and _tag_replica_groups(model, layout, ep_group)
    return mapping, replicated
