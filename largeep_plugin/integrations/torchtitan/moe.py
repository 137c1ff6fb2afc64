"""``LargeEPTitanMoE``: torchtitan's MoE slot, run by a ``LargeEPMoE`` on torchtitan's EP mesh.

Shape legend:  B batch   L sequence   D hidden size   E experts

What torchtitan's code around the MoE reads, and where it finds it here:
    ``forward(x_BLD) -> out_BLD``                       the transformer block calls it
    ``parallelize(parallel_dims)``                      builds the layer on ``parallel_dims``' EP mesh (its EP
                                                        group, ``Shard(0)`` layout: EP rank r holds experts
                                                        r*E/EP .. (r+1)*E/EP - 1, as torchtitan's own EP does)
    ``routed_experts.inner_experts.parameters()``,      ``apply_fsdp_to_decoder`` puts these on the expert FSDP
    ``.num_experts``                                    mesh (``efsdp``, with ``dp_replicate``), the rest on the
                                                        dense one: the expert parameters stay out of the dense
                                                        data-parallel reduction, exactly as torchtitan's own
    ``load_balance_coeff``, ``expert_bias_E``,          ``register_moe_load_balancing_hook``'s optimizer pre-step
    ``tokens_per_expert_E``                             update: our router's selection bias, by torchtitan's rule
    ``init_states()`` (after ``to_empty``)              torchtitan's own ``param_init`` of each weight
    ``state_dict()`` / ``load_state_dict()``            torchtitan's names and layouts (state_dict.py)

The layer is built in ``parallelize``, where the EP mesh is known (the trainer builds the model on the meta device
first): before that the module holds no parameters.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from torchtitan.models.common.moe import MoE
from torchtitan.protocols.module import Module

from largeep_plugin.integrations.hf.convert import placement_for
from largeep_plugin.layer.config import LargeEPConfig
from largeep_plugin.layer.expert_slots import rank_to_experts_of, slot_table
from largeep_plugin.layer.moe_layer import LargeEPMoE
from largeep_plugin.layer.process_groups import ExpertProcessGroups
from largeep_plugin.placement.plan import Placement

from .mapping import WHO, largeep_config
from .state_dict import from_titan, like, to_titan


class _ExpertParameters:
    """``routed_experts.inner_experts`` as torchtitan's FSDP wrapping reads it: this rank's expert parameters and
    the expert count (not a module: the parameters stay registered once, under the layer)."""

    def __init__(self, layer: LargeEPMoE):
        self._layer = layer
        self.num_experts = layer.config.num_experts

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, module in self._layer.local_experts():
            yield from module.parameters()


@dataclass(frozen=True)
class _RoutedExperts:
    inner_experts: _ExpertParameters


class LargeEPTitanMoE(Module):
    """torchtitan's ``MoE`` contract, large-EP inside (the module docstring).

    Attributes:
        layer: the ``LargeEPMoE`` (None until ``parallelize``).
        largeep_config: its ``LargeEPConfig`` (mapping.py).
        load_balance_coeff: the bias step (``bias_update_rate``), None when balancing is off.
        tokens_per_expert_E: float32 [E], this rank's assignments per expert since torchtitan's last bias update.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(MoE.Config):
        """torchtitan's ``MoE.Config`` (its fields copied by the override) plus ``large_ep``: plugin-only
        ``LargeEPConfig`` fields (``overlap_chunks``, ``dispatch``, ``capacity_factor``...)."""

        large_ep: dict[str, Any] = field(default_factory=dict)

    def __init__(self, config: Config):
        super().__init__()
        self.largeep_config: LargeEPConfig = largeep_config(config, config.large_ep)
        self.num_experts = self.largeep_config.num_experts
        self.load_balance_coeff = self.largeep_config.bias_update_rate or None
        self._titan_config = config   # its param_init dicts initialise the weights (init_states)
        self._dtype = torch.get_default_dtype()  # the trainer builds under training.dtype
        self.ep_mesh: DeviceMesh | None = None
        self.register_module("layer", None)
        self.register_buffer("tokens_per_expert_E", torch.zeros(self.num_experts, dtype=torch.float32),
                             persistent=False)
        self.register_state_dict_post_hook(_to_titan)
        self.register_load_state_dict_pre_hook(_from_titan)

    # ---- parallel wiring ---------------------------------------------------------------------------------------
    def parallelize(self, parallel_dims: Any) -> None:
        """Build the layer on ``parallel_dims``' EP mesh (torchtitan's ``ParallelDims``)."""
        if parallel_dims.spmd_backend == "full_dtensor":
            raise NotImplementedError(f"{WHO}: parallelism.spmd_backend='full_dtensor' (DTensor activations) is not "
                                      "supported; use 'spmd_types' (the default) or 'partial_dtensor'")
        if parallel_dims.tp_enabled:
            raise NotImplementedError(f"{WHO}: tensor_parallel_degree={parallel_dims.tp}: tensor parallelism inside "
                                      "the MoE is not supported (expert parallelism only)")
        ep_mesh = parallel_dims.get_optional_mesh("ep")
        if ep_mesh is None:
            raise ValueError(f"{WHO}: expert_parallel_degree={parallel_dims.ep}; the override needs expert "
                             "parallelism (--parallelism.expert_parallel_degree > 1)")
        self.attach(ep_mesh, parallel_dims.get_optional_mesh("efsdp"))

    def attach(self, ep_mesh: DeviceMesh, expert_dp_mesh: DeviceMesh | None = None) -> None:
        """Build the layer over ``ep_mesh`` (1-D); ``expert_dp_mesh``: the ranks that hold the same experts
        (torchtitan's ``efsdp``), named on the expert parameters for ``allreduce_gradients``. No group is
        created."""
        if self.layer is not None:
            raise ValueError(f"{WHO}: the layer is already built (parallelize/attach once)")
        cfg, ep = self.largeep_config, ep_mesh.size()
        if cfg.num_experts % ep:
            raise ValueError(f"{WHO}: num_experts={cfg.num_experts} is not a multiple of the EP size {ep}")
        ep_group = ep_mesh.get_group()
        placement = placement_for(cfg.num_experts, ep_group, None, allow_colocate=True)
        groups = _expert_groups(cfg.num_experts, ep_mesh, expert_dp_mesh, placement)
        device = self.tokens_per_expert_E.device
        with torch.device("cpu"):   # the seeded initialisation draws on the CPU; moved (or made meta) below
            layer = LargeEPMoE(cfg, ep_group, placement=placement, expert_groups=groups)
        self.layer = layer.to(device=device, dtype=self._dtype)
        self.ep_mesh = ep_mesh
        self.layer.router.register_forward_hook(self._count_tokens)

    @property
    def routed_experts(self) -> _RoutedExperts:
        if self.layer is None:
            raise ValueError(f"{WHO}: the MoE has no layer yet: it is built by parallelize() on the EP mesh, which "
                             "needs --parallelism.expert_parallel_degree > 1")
        return _RoutedExperts(_ExpertParameters(self.layer))

    # ---- forward -----------------------------------------------------------------------------------------------
    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        if self.layer is None:
            raise ValueError(f"{WHO}: forward before parallelize(): the layer is built on the EP mesh "
                             "(--parallelism.expert_parallel_degree > 1)")
        return self.layer(x_BLD)

    def _count_tokens(self, _router: nn.Module, _args: tuple, routing: Any) -> None:
        # torchtitan's counter: local assignments of training forwards, summed over the loss mesh by its hook.
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert_E.add_(routing.tokens_per_expert_E)

    # ---- torchtitan's load balancing ---------------------------------------------------------------------------
    @property
    def expert_bias_E(self) -> torch.Tensor | None:
        """The selection bias torchtitan's optimizer hook updates in place: our router's (None without balancing)."""
        if self.load_balance_coeff is None or self.layer is None:
            return None
        return self.layer.router.expert_bias

    # ---- initialisation ----------------------------------------------------------------------------------------
    def _init_self_parameters(self) -> None:
        """torchtitan's ``param_init`` of each of its weights, applied to the matching part of ours (the gate and
        up halves of a fused ``fc1`` each get their own weight's init)."""
        if self.layer is None:
            return
        src, layer = self._titan_config, self.layer
        gate_init = src.router.gate.param_init
        _init_rows(layer.router.weight, [(gate_init, "weight")])
        if layer.router.bias is not None:
            _init_rows(layer.router.bias, [(gate_init, "bias")])
        inner_init = src.routed_experts.inner_experts.param_init
        for _, expert in layer.local_experts():
            _init_rows(expert.fc1.weight, [(inner_init, "w1_EFD"), (inner_init, "w3_EFD")])
            _init_rows(expert.fc2.weight, [(inner_init, "w2_EDF")])
        if layer.shared_expert is not None:
            shared = src.shared_experts
            _init_rows(layer.shared_expert.fc1.weight, [(shared.w1.param_init, "weight"),
                                                        (shared.w3.param_init, "weight")])
            _init_rows(layer.shared_expert.fc2.weight, [(shared.w2.param_init, "weight")])

    def _init_self_buffers(self, *, buffer_device: torch.device | None = None) -> None:
        """After the trainer's ``to_empty`` every buffer holds garbage: the counters restart at zero, the selection
        bias too (as torchtitan's), and the layer's slot table is rebuilt from its placement."""
        with torch.no_grad():
            self.tokens_per_expert_E.zero_()
            layer = self.layer
            if layer is None:
                return
            layer.router.expert_bias.zero_()
            layer.tokens_per_expert_since_update.zero_()
            layer.global_batch_tokens_E.zero_()
            if layer.colocated:
                table = slot_table(rank_to_experts_of(layer.config.num_experts, layer.ep_size, layer.placement),
                                   layer.config.num_experts)
                layer.local_slot_RE.copy_(table)
            if layer.clones is not None:
                layer.clones.reset()  # no load history, no clones: the first steps plan them

    def extra_repr(self) -> str:
        return f"large-EP: {self.layer.extra_repr() if self.layer is not None else 'not built (no EP mesh yet)'}"


def _to_titan(moe: LargeEPTitanMoE, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    """State-dict post-hook: our entries under torchtitan's names (state_dict.py)."""
    if moe.layer is not None:
        to_titan(moe.layer, moe.ep_mesh, moe.load_balance_coeff is not None, state, prefix)


def _from_titan(moe: LargeEPTitanMoE, state: dict[str, Any], prefix: str, *_rest: Any) -> None:
    """Load pre-hook: torchtitan's entries back into ours (state_dict.py)."""
    if moe.layer is not None:
        from_titan(moe.layer, moe.ep_mesh, moe.load_balance_coeff is not None, state, prefix)


@torch.no_grad()
def _init_rows(param: torch.Tensor, parts: list[tuple[dict | None, str]]) -> None:
    """Initialise ``param`` whole, its rows cut in ``len(parts)`` equal blocks, block i by torchtitan's initializer
    ``param_init[name]`` of ``parts[i]``; drawn on a plain tensor (the same on every rank, seeded alike, as
    torchtitan's trainer seeds them) and copied in as ``param`` is laid out (an FSDP shard included)."""
    local = param.to_local() if isinstance(param, DTensor) else param
    whole = torch.empty(param.shape, dtype=param.dtype, device=local.device)
    for (param_init, name), block in zip(parts, whole.chunk(len(parts))):
        if not param_init or name not in param_init:
            raise ValueError(f"{WHO}: no param_init for {name!r} in torchtitan's config; set one (torchtitan's own "
                             "models do), or load the weights from a checkpoint")
        param_init[name](block)
    param.copy_(like(param, whole))


def _expert_groups(num_experts: int, ep_mesh: DeviceMesh, expert_dp_mesh: DeviceMesh | None,
                   placement: Placement | None) -> ExpertProcessGroups | None:
    """The layer's expert groups from torchtitan's meshes (none created): None when the EP group is the world."""
    if dist.get_world_size() == ep_mesh.size():
        return None
    layout = placement if placement is not None else Placement.identity(num_experts)
    ep_ranks = tuple(int(r) for r in ep_mesh.mesh.flatten().tolist())
    rank = dist.get_rank()
    mine = layout.rank_to_experts[ep_ranks.index(rank)]
    dp_group = expert_dp_mesh.get_group() if expert_dp_mesh is not None and expert_dp_mesh.size() > 1 else None
    dp_ranks = tuple(int(r) for r in expert_dp_mesh.mesh.flatten().tolist()) if dp_group is not None else (rank,)
    return ExpertProcessGroups(
        placement=layout, rank=rank, ep_ranks=ep_ranks, ep_group=ep_mesh.get_group(), expert_tp_group=None,
        expert_dp_groups={e: dp_group for e in mine}, expert_dp_ranks={e: dp_ranks for e in mine},
        replica_groups={e: None for e in mine}, replica_ranks={e: (rank,) for e in mine})


def replace_config(cfg: MoE.Config, large_ep: dict[str, Any]) -> LargeEPTitanMoE.Config:
    """``LargeEPTitanMoE.Config`` from torchtitan's ``cfg`` (its fields copied), validated now: a setting the
    override cannot take fails when the override is applied, before anything is built."""
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(MoE.Config)}
    shared["sharding_config"] = None   # the layer does its own parallel wiring; torchtitan's would shard our states
    new = LargeEPTitanMoE.Config(**shared, large_ep=dict(large_ep))
    largeep_config(new, new.large_ep)
    return new
