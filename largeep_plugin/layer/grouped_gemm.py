"""Colocated experts as grouped GEMMs: one ``torch._grouped_mm`` per linear for all the experts of a rank, instead
of a loop over them (``LargeEPConfig(grouped_gemm=True)``; ``experts.LocalExperts`` calls it).

Shape legend:
    M  rows this rank's experts receive, sorted by slot      L  local experts (slots)      H  hidden size
    X  fc1 rows (F, or 2F for the GLUs)                      F  expert ffn hidden size

The experts keep their own parameters (``<slot>.fc1.weight`` ..., the checkpoint layout); each call stacks them
into [L, H, X] / [L, F, H] views for the two grouped GEMMs, whose row groups end at ``offs`` (the cumulative rows
per slot, int32). Biases are added per row from the row's slot.

Where it runs (opt-in, because the core cannot ask a device what it supports): on CPU in float32 and bfloat16;
on NVIDIA GPUs of compute capability 9.0 and above (H100, H200) in bfloat16. Rows of every operand must be a
multiple of 16 bytes (H, X and F times the element size): a ValueError names the sizes otherwise.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .config import ExpertConfig


def check_grouped_gemm(config: ExpertConfig, dtype: torch.dtype) -> None:
    """ValueError unless ``torch._grouped_mm`` can take the experts' operands in ``dtype``."""
    if not hasattr(torch, "_grouped_mm"):
        raise NotImplementedError("grouped_gemm=True needs torch._grouped_mm (torch >= 2.8)")
    size = torch.empty((), dtype=dtype).element_size()
    f = config.ffn_hidden_size
    widths = {"hidden_size": config.hidden_size, "ffn_hidden_size": f}
    bad = {name: w for name, w in widths.items() if (w * size) % 16}
    if bad:
        raise ValueError(f"grouped_gemm=True needs rows of 16 bytes multiples: {bad} in {dtype} "
                         f"({size} bytes each) are not; set grouped_gemm=False")


def grouped_mlp(experts: Sequence[Any], rows_MH: torch.Tensor, per_slot: Sequence[int],
                config: ExpertConfig, per_slot_dev: torch.Tensor | None = None) -> torch.Tensor:
    """All local experts on their rows in two grouped GEMMs.

    Args:
        experts: what computes each slot: an ``ExpertMLP`` or a clone's ``experts.MLPWeights`` (``fc1``, ``fc2``
            with ``weight`` and ``bias``; the same config).
        rows_MH: rows sorted by slot: ``per_slot[l]`` rows of slot l, slot after slot.
        per_slot: rows per slot (host ints).
        per_slot_dev: the same counts on the rows' device (int64 [L]), from the count exchange: the group offsets
            then need no host-to-device copy. None: copied from ``per_slot``.
    Returns:
        out_MH: each row through its slot's expert, in the same order.
    """
    from .experts import activate, compute_dtype  # experts.py imports this module: a late import, no circle

    out_dtype = rows_MH.dtype
    dtype = compute_dtype(config) or out_dtype  # expert_compute_dtype: operands cast, the result back in out_dtype
    rows_MH = rows_MH.to(dtype)
    check_grouped_gemm(config, dtype)
    dev = rows_MH.device
    if per_slot_dev is None:
        per_slot_dev = torch.tensor(per_slot, dtype=torch.int64).to(dev)
    offs = per_slot_dev.cumsum(0).to(torch.int32)
    w1_LHX = torch.stack([e.fc1.weight for e in experts]).to(dtype).transpose(1, 2)
    w2_LFH = torch.stack([e.fc2.weight for e in experts]).to(dtype).transpose(1, 2)
    h_MX = torch._grouped_mm(rows_MH, w1_LHX, offs=offs)
    slot_M = None
    if experts[0].fc1.bias is not None or experts[0].fc2.bias is not None:
        slot_M = torch.repeat_interleave(torch.arange(len(per_slot), device=dev), per_slot_dev,
                                         output_size=rows_MH.shape[0])
    if experts[0].fc1.bias is not None:
        h_MX = h_MX + torch.stack([e.fc1.bias for e in experts]).to(dtype).index_select(0, slot_M)
    out_MH = torch._grouped_mm(activate(h_MX, config).contiguous(), w2_LFH, offs=offs)
    if experts[0].fc2.bias is not None:
        out_MH = out_MH + torch.stack([e.fc2.bias for e in experts]).to(dtype).index_select(0, slot_M)
    return out_MH.to(out_dtype)
