"""Checkpoints: load a converted model reading only this rank's experts; save one plain transformers loads.

``from_pretrained`` builds the model on the meta device (nothing allocated), converts it (each large-EP block
allocates only the router, shared expert and this rank's experts), then reads from the safetensors files
(``model.safetensors``, or the shards of ``model.safetensors.index.json``) each dense tensor and only this rank's
experts: in the per-expert layout that transformers 5 writes (``experts.<e>.gate_proj.weight``...; Mixtral
``block_sparse_moe.experts.<e>.w1.weight``...) each expert is its own tensor; in the fused layout
(``experts.gate_up_proj`` [E, 2F, H]) only the expert's rows are read (``get_slice(name)[e]`` on a memory-mapped
file).

``save_pretrained`` gathers every expert to global rank 0 under its global id, one block at a time, fuses them back
into the module layout of transformers 5 (``experts.gate_up_proj`` [E, 2F, H], ``experts.down_proj`` [E, H, F]) and
rank 0 writes safetensors shards as they fill (``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` with
``model.safetensors.index.json`` past ``max_shard_size``) and ``config.json``; transformers loads fused keys as they
are.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from largeep_plugin.layer.comm import ProcessGroup, group_rank, group_size, settle
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


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_SHARD_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")


def parse_size(max_shard_size: int | str) -> int:
    """Bytes of ``max_shard_size``: an int, or a string like transformers takes ("5GB", "200MB", "20KiB")."""
    if isinstance(max_shard_size, int) and not isinstance(max_shard_size, bool) and max_shard_size > 0:
        return max_shard_size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Z]*)\s*", str(max_shard_size).upper())
    if not match or match.group(2) not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"max_shard_size={max_shard_size!r}: expected a positive byte count or a size such as "
                         "\"5GB\", \"200MB\", \"512MiB\"")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_bytes`` each (a tensor larger than that gets a shard
    of its own), flushing each shard as soon as it is full, so the writer holds one shard at a time. ``close``
    names them as transformers does: ``model.safetensors`` when one is enough, else
    ``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json``."""

    def __init__(self, path: str, max_bytes: int):
        self.path, self.max_bytes = path, max_bytes
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):   # an earlier save's shards would shadow or mix with these
            if _SHARD_FILE.match(name) or name == _INDEX:
                os.remove(os.path.join(path, name))
        self._shard: dict[str, torch.Tensor] = {}
        self._bytes = 0
        self._files: list[tuple[str, list[str]]] = []   # (temporary file, its keys)
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._shard and self._bytes + size > self.max_bytes:
            self._flush()
        # Own contiguous CPU copies: safetensors refuses tensors that share storage (tied embeddings).
        self._shard[key] = tensor.detach().cpu().contiguous().clone()
        self._bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        file = os.path.join(self.path, f".model-part{len(self._files):05d}.safetensors")
        save_file(self._shard, file, metadata={"format": "pt"})
        self._files.append((file, list(self._shard)))
        self._shard, self._bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, give the shards their final names (and the index); returns the file names."""
        if self._shard or not self._files:
            self._flush()
        n = len(self._files)
        names = [_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for (file, _), name in zip(self._files, names):
            os.replace(file, os.path.join(self.path, name))
        if n > 1:
            weight_map = {key: name for (_, keys), name in zip(self._files, names) for key in keys}
            with open(os.path.join(self.path, _INDEX), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=2)
        return names


def _gather_experts(moe: Any) -> dict[int, dict[str, torch.Tensor]] | None:
    """Every expert of ``moe`` by global id on the rank that writes (global rank 0), None elsewhere.

    Only the EP group that holds global rank 0 gathers (another data-parallel copy holds the same experts), and only
    to its first rank: the other ranks never hold experts they do not own."""
    mine = local_expert_tensors(moe)
    if group_size(moe.ep_group) == 1:
        return mine if group_rank(None) == 0 else None
    ranks = dist.get_process_group_ranks(moe.ep_group if moe.ep_group is not None else dist.group.WORLD)
    if ranks[0] != 0:
        return None
    gathered: list[Any] | None = [None] * len(ranks) if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0, group=moe.ep_group)
    if gathered is None:
        return None
    return {e: tensors for held in gathered for e, tensors in held.items()}   # replicas: any copy


def save_pretrained(model: nn.Module, path: str, max_shard_size: int | str = "5GB") -> list[str]:
    """Write a checkpoint of the unconverted architecture that plain ``transformers`` loads (global rank 0 writes).

    Collective over every large-EP block's EP group: call it on every rank. Each block's experts are gathered, to
    global rank 0 only, under their global ids (replicas: any copy) and fused back into ``experts.gate_up_proj``
    [E, 2F, H] and ``experts.down_proj`` [E, H, F]; shards are written as they fill (``max_shard_size``, as
    transformers takes it), so the writer holds one block's experts and one shard at a time.

    Returns:
        the safetensors files written (on rank 0; an empty list on the other ranks).
    """
    rank0 = group_rank(None) == 0
    writer = ShardWriter(path, parse_size(max_shard_size)) if rank0 else None
    blocks = _blocks(model)
    for prefix, block in blocks.items():
        moe = block.moe
        experts = _gather_experts(moe)
        if writer is None or experts is None:
            continue
        if block.family.selection_bias is None and bool(moe.router.expert_bias.ne(0).any()):
            warnings.warn(f"{prefix}: {block.family.name} has no selection bias in its checkpoint; the large-EP "
                          "balancing bias is not saved", stacklevel=2)
        for name, tensor in block_state(moe, block.family, experts).items():
            writer.add(f"{prefix}.{name}", tensor)
        del experts
    files: list[str] = []
    if writer is not None:
        block_keys = tuple(f"{p}." for p in blocks)
        for key, tensor in model.state_dict().items():
            if not key.startswith(block_keys):
                writer.add(key, tensor)
        files = writer.close()
        model.config.save_pretrained(path)
    settle()  # every rank leaves when rank 0 has written (a barrier that holds no earlier work: comm.settle)
    return files
