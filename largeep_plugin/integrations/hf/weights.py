"""Weight mapping between a Hugging Face MoE block and the ``LargeEPMoE`` that replaces it.

Shape legend:  E experts   H hidden size   F expert ffn size   Fs shared expert ffn size

Names on the Hugging Face side are relative to the block (``gate.weight``, ``experts.gate_up_proj``); on ours,
relative to the ``LargeEPMoE`` (``router.weight``, ``expert.fc1.weight`` or ``experts.<slot>.fc1.weight``). A
``Reader`` fetches one Hugging Face tensor, or one expert's row of a fused one, so the same mapping loads from a
live block and from a safetensors file, and reads only the experts this rank holds.
"""
from __future__ import annotations

from typing import Callable

import torch

from largeep_plugin.layer.moe_layer import LargeEPMoE

from .families import Family

Reader = Callable[[str, "int | None"], torch.Tensor]
"""``read(hf_name, expert)``: the block's tensor ``hf_name``, or its row ``expert`` when not None ([E, ...] fused)."""


def _expert_prefix(moe: LargeEPMoE, slot: int) -> str:
    return f"experts.{slot}." if moe.colocated else "expert."


def expert_sources(moe: LargeEPMoE) -> dict[str, tuple[str, int]]:
    """Our expert parameter -> (fused Hugging Face tensor, global expert id), for the experts this rank holds."""
    out: dict[str, tuple[str, int]] = {}
    for slot, (expert_id, _) in enumerate(moe.local_experts()):
        prefix = _expert_prefix(moe, slot)
        out[prefix + "fc1.weight"] = ("experts.gate_up_proj", expert_id)   # [2F, H], gate rows first in both
        out[prefix + "fc2.weight"] = ("experts.down_proj", expert_id)      # [H, F]
    return out


def dense_sources(family: Family) -> dict[str, tuple[str, ...]]:
    """Our dense tensor -> the Hugging Face tensors it is the row-concatenation of."""
    out: dict[str, tuple[str, ...]] = {"router.weight": ("gate.weight",)}
    if family.selection_bias is not None:
        out["router.expert_bias"] = (family.selection_bias,)
    if family.shared_prefix is not None:
        p = family.shared_prefix
        out["shared_expert.fc1.weight"] = (f"{p}.gate_proj.weight", f"{p}.up_proj.weight")   # [2Fs, H], gate first
        out["shared_expert.fc2.weight"] = (f"{p}.down_proj.weight",)
    if family.shared_gate is not None:
        out["shared_expert_gate.weight"] = (f"{family.shared_gate}.weight",)
    return out


@torch.no_grad()
def load_block_weights(moe: LargeEPMoE, family: Family, read: Reader) -> list[str]:
    """Copy a block's router, shared expert and this rank's experts into ``moe``; returns the names read."""
    state = moe.state_dict(keep_vars=True)
    read_names: list[str] = []
    for ours, theirs in dense_sources(family).items():
        state[ours].copy_(torch.cat([read(name, None) for name in theirs]))
        read_names += theirs
    for ours, (name, expert_id) in expert_sources(moe).items():
        state[ours].copy_(read(name, expert_id))
        read_names.append(f"{name}[{expert_id}]")
    return read_names


def block_state(moe: LargeEPMoE, family: Family,
                experts: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The Hugging Face block's state dict from ``moe``'s dense tensors and ``experts`` (every global id:
    ``{"fc1.weight": [2F, H], "fc2.weight": [H, F]}``), fused back into [E, 2F, H] and [E, H, F]."""
    state = moe.state_dict()
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in dense_sources(family).items():
        # Concatenated parts have equal rows (gate and up of a shared expert are the same size).
        for name, part in zip(theirs, torch.chunk(state[ours], len(theirs))):
            out[name] = part
    ids = sorted(experts)
    if ids != list(range(moe.config.num_experts)):
        raise ValueError(f"expert ids {ids}: every expert 0..{moe.config.num_experts - 1} is needed to save the block")
    out["experts.gate_up_proj"] = torch.stack([experts[e]["fc1.weight"] for e in ids])
    out["experts.down_proj"] = torch.stack([experts[e]["fc2.weight"] for e in ids])
    return out


def local_expert_tensors(moe: LargeEPMoE) -> dict[int, dict[str, torch.Tensor]]:
    """This rank's experts by global id, on the CPU (what rank 0 gathers to save)."""
    return {expert_id: {k: v.detach().cpu() for k, v in module.state_dict().items()}
            for expert_id, module in moe.local_experts()}
