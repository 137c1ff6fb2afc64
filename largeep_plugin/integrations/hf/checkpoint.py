"""Checkpoints: load a converted model reading only this rank's experts; save one plain transformers loads.

``from_pretrained`` builds the model on the meta device (nothing allocated), converts it (each large-EP block
allocates only the router, shared expert and this rank's experts), then reads from the safetensors files
(``model.safetensors``, or the shards of ``model.safetensors.index.json``) each dense tensor and only this rank's
experts: in the per-expert layout that transformers 5 writes (``experts.<e>.gate_proj.weight``...; Mixtral
``block_sparse_moe.experts.<e>.w1.weight``...) each expert is its own tensor; in the fused layout
(``experts.gate_up_proj`` [E, 2F, H]) only the expert's rows are read (``get_slice(name)[e]`` on a memory-mapped
file).

``save_pretrained`` gathers every expert under its global id, fuses them back into the module layout of
transformers 5 (``experts.gate_up_proj`` [E, 2F, H], ``experts.down_proj`` [E, H, F]) and rank 0 writes
``model.safetensors`` and ``config.json``; transformers loads fused keys as they are.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from largeep_plugin.layer.comm import ProcessGroup, group_rank, group_size
from largeep_plugin.placement.plan import Placement

from .block import LargeEPHFBlock
from .convert import _convert, check_overrides
from .families import Family
from .weights import Reader, block_state, load_block_weights, local_expert_tensors

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


class SafetensorsReader:
    """Tensors of a (possibly sharded) safetensors checkpoint by name, opened lazily.

    Attributes:
        reads: ``(name, row)`` for every read, row None for a whole tensor: what tests check.
    """

    def __init__(self, path: str):
        index = os.path.join(path, _INDEX)
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                self.file_of: dict[str, str] = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
        elif os.path.exists(os.path.join(path, _SINGLE)):
            single = os.path.join(path, _SINGLE)
            with safe_open(single, framework="pt") as f:
                self.file_of = {k: single for k in f.keys()}
        else:
            raise ValueError(f"path={path!r}: neither {_SINGLE} nor {_INDEX} there")
        self._open: dict[str, Any] = {}
        self.reads: list[tuple[str, int | None]] = []

    def _handle(self, name: str) -> Any:
        if name not in self.file_of:
            raise KeyError(f"{name!r} is not in the checkpoint")
        file = self.file_of[name]
        if file not in self._open:
            self._open[file] = safe_open(file, framework="pt")
        return self._open[file]

    def close(self) -> None:
        """Drop the open files (their memory maps go with them)."""
        self._open.clear()

    def read(self, name: str, row: int | None = None) -> torch.Tensor:
        self.reads.append((name, row))
        if row is None:
            return self._handle(name).get_tensor(name)
        return self._handle(name).get_slice(name)[row]


def block_reader(reader: SafetensorsReader, prefix: str, family: Family) -> Reader:
    """The ``Reader`` of the block at ``prefix`` (module names) in a checkpoint with fused experts (module
    layout) or per-expert tensors (the layout transformers 5 writes): one expert's tensors only, either way."""
    parent, _, own = prefix.rpartition(".")
    disk = f"{parent}.{family.disk_block or own}" if parent else (family.disk_block or own)

    def read(name: str, row: int | None) -> torch.Tensor:
        if f"{prefix}.{name}" in reader.file_of:
            return reader.read(f"{prefix}.{name}", row)
        if row is None:
            return reader.read(f"{disk}.{name}")
        gate, up, down = family.disk_experts
        expert = f"{disk}.experts.{row}"
        if name == "experts.down_proj":
            return reader.read(f"{expert}.{down}.weight")
        return torch.cat([reader.read(f"{expert}.{gate}.weight"), reader.read(f"{expert}.{up}.weight")])

    return read


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    """Replace the (meta) parameter or buffer ``key`` with ``value``."""
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    if attr in owner._parameters:
        old = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(value.to(old.dtype), requires_grad=old.requires_grad)
    else:
        owner._buffers[attr] = value.to(owner._buffers[attr].dtype)


def _blocks(model: nn.Module) -> dict[str, LargeEPHFBlock]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LargeEPHFBlock)}


def _restore_non_persistent_buffers(model: nn.Module) -> None:
    """Buffers not in checkpoints (rotary ``inv_freq``) are computed by transformers' own initialisation."""
    for module in model.modules():
        meta = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if not meta:
            continue
        for name in meta:
            module._buffers[name] = torch.empty_like(module._buffers[name], device="cpu")
        model._init_weights(module)


def from_pretrained(path: str, ep_group: ProcessGroup | None = None, placement: Placement | None = None,
                    allow_colocate: bool = False, dtype: torch.dtype | None = None,
                    reader: SafetensorsReader | None = None, **overrides: Any) -> nn.Module:
    """A converted ``AutoModelForCausalLM`` from a local checkpoint folder, experts read for this rank only.

    Args:
        path: a folder with ``config.json`` and safetensors weights (one file, or shards with an index).
        ep_group, placement, allow_colocate, overrides: as for ``convert_model``.
        dtype: the parameters' dtype (default: what ``from_config`` builds, float32 unless the config says
            otherwise); the checkpoint's tensors are cast to it.
        reader: the reader to use (tests pass one to see what was read); default: a new one on ``path``.
    Returns:
        the model on the CPU; move it to its device after loading.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    check_overrides(overrides)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if dtype is not None:
        model.to(dtype)
    _convert(model, ep_group, placement, allow_colocate, overrides, load=False)
    own_reader = reader is None
    reader = reader or SafetensorsReader(path)
    blocks = _blocks(model)
    for prefix, block in blocks.items():
        load_block_weights(block.moe, block.family, block_reader(reader, prefix, block.family))
    block_keys = tuple(f"{p}." for p in blocks)
    for key, tensor in list(model.state_dict(keep_vars=True).items()):
        if key.startswith(block_keys) or not tensor.is_meta:
            continue
        if key in reader.file_of:
            _set_tensor(model, key, reader.read(key))
    if own_reader:
        reader.close()
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    _restore_non_persistent_buffers(model)
    missing = [k for k, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if missing:
        raise ValueError(f"path={path!r}: the checkpoint lacks {missing}")
    return model


def save_pretrained(model: nn.Module, path: str) -> None:
    """Write a checkpoint of the unconverted architecture that plain ``transformers`` loads (rank 0 writes).

    Collective over every large-EP block's EP group: call it on every rank. Experts are gathered to every rank of
    the group under their global ids (replicas: any copy) and fused back into ``experts.gate_up_proj`` [E, 2F, H]
    and ``experts.down_proj`` [E, H, F].
    """
    state: dict[str, torch.Tensor] = {}
    blocks = _blocks(model)
    for prefix, block in blocks.items():
        moe = block.moe
        gathered: list[Any] = [None] * group_size(moe.ep_group)
        mine = local_expert_tensors(moe)
        if len(gathered) > 1:
            dist.all_gather_object(gathered, mine, group=moe.ep_group)
        else:
            gathered = [mine]
        experts = {e: tensors for held in gathered for e, tensors in held.items()}
        if block.family.selection_bias is None and bool(moe.router.expert_bias.ne(0).any()):
            warnings.warn(f"{prefix}: {block.family.name} has no selection bias in its checkpoint; the large-EP "
                          "balancing bias is not saved", stacklevel=2)
        for name, tensor in block_state(moe, block.family, experts).items():
            state[f"{prefix}.{name}"] = tensor
    block_keys = tuple(f"{p}." for p in blocks)
    for key, tensor in model.state_dict().items():
        if not key.startswith(block_keys):
            state[key] = tensor
    if group_rank(None) == 0:
        os.makedirs(path, exist_ok=True)
        # Own contiguous CPU copies: safetensors refuses tensors that share storage (tied embeddings).
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()},
                  os.path.join(path, _SINGLE), metadata={"format": "pt"})
        model.config.save_pretrained(path)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
