"""The layer's state dict under torchtitan's names and layouts, both ways, so that DCP checkpoints move between
runs with and without the override.

Shape legend:  E experts   e experts of this EP rank   D hidden size   F expert ffn size   Fs shared ffn size

    ours (``LargeEPTitanMoE.layer``, a ``LargeEPMoE``)     torchtitan's ``MoE``
    layer.router.weight [E, D] (.bias with router_bias)   router.gate.weight [E, D] (.bias)
    layer.router.expert_bias [E]                          expert_bias_E [E] (only with load_balance_coeff)
    layer.shared_expert.fc1.weight [2Fs, D] gate first    shared_experts.w1.weight [Fs, D], .w3.weight [Fs, D]
    layer.shared_expert.fc2.weight [D, Fs]                shared_experts.w2.weight [D, Fs]
    layer.expert(s).<slot>.fc1.weight [2F, D]             routed_experts.inner_experts.w1_EFD, w3_EFD [E, F, D]
    layer.expert(s).<slot>.fc2.weight [D, F]              routed_experts.inner_experts.w2_EDF [E, D, F]

Dynamic replicas' state (``layer.clones.*``: the load history and the plan) is left out both ways: a run without
the override has nothing to hold it, so a checkpoint keeps torchtitan's keys only, and a resumed run plans its
clones afresh from the load it sees.

The expert tensors are DTensors ``Shard(0)`` on torchtitan's EP mesh, global [E, ...], as torchtitan's own
``GroupedExperts`` weights are: EP rank r holds experts r*e .. r*e+e-1 in both layers, so DCP reads and writes the
same chunks whichever layer runs. Under FSDP a parameter is a DTensor over its FSDP mesh; it is gathered whole to be
split or stacked (``full``) and sharded back the same way on load (``like``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

EXPERT_KEYS = ("routed_experts.inner_experts.w1_EFD", "routed_experts.inner_experts.w3_EFD",
               "routed_experts.inner_experts.w2_EDF")


def full(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: an FSDP (or other) DTensor gathered, a plain tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (whole) laid out as ``param`` is: sharded as its DTensor (locally, no communication), or plain."""
    if isinstance(param, DTensor):
        return distribute_tensor(full(value), param.device_mesh, param.placements, src_data_rank=None)
    return full(value)


def _dense_names(layer: Any, load_balancing: bool) -> dict[str, str]:
    """Our dense tensor names -> torchtitan's, renamed as they are."""
    names = {"router.weight": "router.gate.weight"}
    if layer.router.bias is not None:
        names["router.bias"] = "router.gate.bias"
    if load_balancing:
        names["router.expert_bias"] = "expert_bias_E"
    if layer.shared_expert is not None:
        names["shared_expert.fc2.weight"] = "shared_experts.w2.weight"
    return names


def _expert_prefixes(layer: Any) -> list[str]:
    return [f"experts.{slot}." for slot in range(len(layer.expert_ids))] if layer.colocated else ["expert."]


def to_titan(layer: Any, ep_mesh: DeviceMesh, load_balancing: bool, state: dict[str, torch.Tensor],
             prefix: str) -> None:
    """Rewrite, in place, the entries of ``state`` under ``prefix + "layer."`` into torchtitan's (module doc)."""
    ours = prefix + "layer."
    for key in [k for k in state if k.startswith(ours + "clones.")]:
        del state[key]
    for name, theirs in _dense_names(layer, load_balancing).items():
        state[prefix + theirs] = state.pop(ours + name)
    state.pop(ours + "router.expert_bias", None)   # without load_balance_coeff torchtitan keeps no selection bias
    if layer.shared_expert is not None:
        fc1 = full(state.pop(ours + "shared_expert.fc1.weight"))
        w1, w3 = fc1.chunk(2)
        state[prefix + "shared_experts.w1.weight"], state[prefix + "shared_experts.w3.weight"] = w1, w3
    fc1s = [full(state.pop(ours + p + "fc1.weight")) for p in _expert_prefixes(layer)]
    fc2s = [full(state.pop(ours + p + "fc2.weight")) for p in _expert_prefixes(layer)]
    f = fc1s[0].shape[0] // 2
    local = {EXPERT_KEYS[0]: torch.stack([w[:f] for w in fc1s]), EXPERT_KEYS[1]: torch.stack([w[f:] for w in fc1s]),
             EXPERT_KEYS[2]: torch.stack(fc2s)}
    for key, rows_eXY in local.items():
        state[prefix + key] = DTensor.from_local(rows_eXY, ep_mesh, [Shard(0)], run_check=False)


def _local_rows(value: torch.Tensor, layer: Any, ep_mesh: DeviceMesh, key: str) -> torch.Tensor:
    """This rank's experts' rows [e, ...] of an incoming torchtitan expert tensor [E, ...]."""
    if isinstance(value, DTensor) and value.device_mesh == ep_mesh and tuple(value.placements) == (Shard(0),):
        return value.to_local()   # our own layout (a DCP load into our state dict): the rows are already here
    whole = full(value)
    num_experts = layer.config.num_experts
    if whole.shape[0] != num_experts:
        raise ValueError(f"{key} has shape {tuple(whole.shape)}: expected [{num_experts}, ...], every expert")
    return whole[list(layer.expert_ids)]


def from_titan(layer: Any, ep_mesh: DeviceMesh, load_balancing: bool, state: dict[str, torch.Tensor],
               prefix: str) -> None:
    """Rewrite, in place, torchtitan's entries under ``prefix`` into ours (the module docstring), laid out as our
    parameters are; entries not there are left for ``load_state_dict`` to report as missing."""
    ours = prefix + "layer."
    params = layer.state_dict(keep_vars=True)
    for name, value in params.items():
        if name.startswith("clones."):  # not in torchtitan's checkpoints: the layer keeps its own (module doc)
            state.setdefault(ours + name, value.detach().clone())
    for name, theirs in _dense_names(layer, load_balancing).items():
        if prefix + theirs in state:
            state[ours + name] = like(params[name], state.pop(prefix + theirs))
    w1_key, w3_key = prefix + "shared_experts.w1.weight", prefix + "shared_experts.w3.weight"
    if layer.shared_expert is not None and w1_key in state and w3_key in state:
        fc1 = torch.cat([full(state.pop(w1_key)), full(state.pop(w3_key))])
        state[ours + "shared_expert.fc1.weight"] = like(params["shared_expert.fc1.weight"], fc1)
    if not all(prefix + key in state for key in EXPERT_KEYS):
        return
    w1, w3, w2 = (_local_rows(state.pop(prefix + key), layer, ep_mesh, key) for key in EXPERT_KEYS)
    for slot, p in enumerate(_expert_prefixes(layer)):
        state[ours + p + "fc1.weight"] = like(params[p + "fc1.weight"], torch.cat([w1[slot], w3[slot]]))
        state[ours + p + "fc2.weight"] = like(params[p + "fc2.weight"], w2[slot])
