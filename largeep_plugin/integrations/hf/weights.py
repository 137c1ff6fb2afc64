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


def expert_sources(family: Family) -> dict[str, str]:
    """An expert's ``ExpertMLP`` tensor -> the fused Hugging Face tensor [E, ...] whose row it comes from."""
    out = {"fc1.weight": "experts.gate_up_proj", "fc2.weight": "experts.down_proj"}
    if family.interleaved:
        out.update({"fc1.bias": "experts.gate_up_proj_bias", "fc2.bias": "experts.down_proj_bias"})
    return out


def expert_from_hf(family: Family, read: Reader, expert_id: int) -> dict[str, torch.Tensor]:
    """One expert's ``ExpertMLP`` state (fc1 [2F, H] gate rows first, fc2 [H, F], biases) from the fused tensors."""
    rows = {ours: read(theirs, expert_id) for ours, theirs in expert_sources(family).items()}
    if not family.interleaved:
        return rows   # already our layout
    # gpt-oss: [H, 2F] with gate and up in alternate columns, [F, H]: transpose, gate columns first.
    gate_up, bias = rows["fc1.weight"], rows["fc1.bias"]
    return {"fc1.weight": torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], dim=1).t(),
            "fc1.bias": torch.cat([bias[0::2], bias[1::2]]),
            "fc2.weight": rows["fc2.weight"].t(), "fc2.bias": rows["fc2.bias"]}


def tensor_sources(moe: LargeEPMoE, family: Family) -> dict[str, tuple[str, ...]]:
    """Every tensor of ``moe`` read from the Hugging Face block -> the block's tensors it comes from (this rank's
    experts from rows of the fused ones): what lets optimizer groups built on the unconverted model follow."""
    out = dense_sources(family)
    for slot, _ in enumerate(moe.local_experts()):
        for ours, theirs in expert_sources(family).items():
            out[_expert_prefix(moe, slot) + ours] = (theirs,)
    return out


def experts_to_hf(family: Family, experts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The fused Hugging Face tensors [E, ...] from every expert's ``ExpertMLP`` state, in expert-id order."""
    fc1 = torch.stack([e["fc1.weight"] for e in experts])      # [E, 2F, H]
    fc2 = torch.stack([e["fc2.weight"] for e in experts])      # [E, H, F]
    if not family.interleaved:
        return {"experts.gate_up_proj": fc1, "experts.down_proj": fc2}
    f = fc1.shape[1] // 2
    bias = torch.stack([e["fc1.bias"] for e in experts])      # [E, 2F]
    return {"experts.gate_up_proj": torch.stack([fc1[:, :f], fc1[:, f:]], dim=2).flatten(1, 2).transpose(1, 2),
            "experts.gate_up_proj_bias": torch.stack([bias[:, :f], bias[:, f:]], dim=2).flatten(1),
            "experts.down_proj": fc2.transpose(1, 2),
            "experts.down_proj_bias": torch.stack([e["fc2.bias"] for e in experts])}


def dense_sources(family: Family) -> dict[str, tuple[str, ...]]:
    """Our dense tensor -> the Hugging Face tensors it is the row-concatenation of."""
    out: dict[str, tuple[str, ...]] = {"router.weight": (f"{family.router}.weight",)}
    if family.router_bias:
        out["router.bias"] = (f"{family.router}.bias",)
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
    for slot, (expert_id, _) in enumerate(moe.local_experts()):
        for name, tensor in expert_from_hf(family, read, expert_id).items():
            state[_expert_prefix(moe, slot) + name].copy_(tensor)
        read_names.append(f"experts[{expert_id}]")
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
    out.update(experts_to_hf(family, [experts[e] for e in ids]))
    return out


def local_expert_tensors(moe: LargeEPMoE) -> dict[int, dict[str, torch.Tensor]]:
    """This rank's experts by global id, on the CPU (what rank 0 gathers to save)."""
    return {expert_id: {k: v.detach().cpu() for k, v in module.state_dict().items()}
            for expert_id, module in moe.local_experts()}
