"""An expert's whole training state, wherever a route keeps it: what a move sends and what a checkpoint stores.

Shape legend:  P numbers of one parameter      B bytes of one expert's packed state

A home expert's training state is more than its weights: its gradient (between backward and the step), and the
optimizer's state for each of its parameters (Adam's moments and step count; fp32 master copies where the route
keeps them). Routes keep it in different places: a torch optimizer in ``optimizer.state[param]``, DeepSpeed's ZeRO
in flat partitions reached through its fragment API (``integrations/deepspeed/training_state.py``). A
``StateAccess`` reads and writes it per parameter as plain tensors of the parameter's shape (and a few numbers),
so moving an expert (``moves.py``) and checkpointing it by its global id (``training_state.py``) are written once,
for every route.

    access.read(p)  -> {"param": tensor, "grad": tensor or None, "optim.<key>": tensor or number, ...}
    access.write(p, state)

``pack`` turns the states of one expert's parameters into one flat uint8 buffer (bytes exactly, whatever the
dtypes), with a ``Layout`` that ``unpack`` reads back: a move sends one buffer per expert over the EP group
(``comm.exchange_rows``).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import torch
import torch.nn as nn

State = dict[str, Any]
"""One parameter's training state: ``"param"`` (its value; the fp32 master where a route keeps one), ``"grad"``
(or None), ``"optim.<key>"`` (each optimizer state entry: a tensor, a number, or None)."""


class StateAccess(Protocol):
    """How one route keeps its parameters' training state. ``read`` and ``write`` may be collective over the group
    a parameter is partitioned over (ZeRO): every rank holding the parameter calls them in the same order."""

    def read(self, param: nn.Parameter, *, grad: bool) -> State:
        """The state of ``param``; ``grad``: include its gradient (a move: yes; a checkpoint: no)."""
        ...

    def write(self, param: nn.Parameter, state: Mapping[str, Any]) -> None:
        """Set the state of ``param`` from ``state`` (what ``read`` returned on the rank that had it)."""
        ...


class TorchOptimizerState:
    """The state a ``torch.optim.Optimizer`` keeps: ``optimizer.state[param]`` (Adam's ``exp_avg``,
    ``exp_avg_sq``, ``step``; SGD's ``momentum_buffer``...), the parameter and its ``.grad``. ``optimizer`` None:
    the parameter (and gradient) alone."""

    def __init__(self, optimizer: torch.optim.Optimizer | None):
        self.optimizer = optimizer

    def read(self, param: nn.Parameter, *, grad: bool) -> State:
        state: State = {"param": param.detach()}
        if grad:
            state["grad"] = None if param.grad is None else param.grad.detach()
        if self.optimizer is not None:
            for key, value in sorted(self.optimizer.state.get(param, {}).items()):
                state[f"optim.{key}"] = value.detach() if torch.is_tensor(value) else value
        return state

    @torch.no_grad()
    def write(self, param: nn.Parameter, state: Mapping[str, Any]) -> None:
        param.copy_(state["param"])
        if "grad" in state:
            g = state["grad"]
            if g is None:
                param.grad = None
            elif param.grad is None:
                param.grad = g.to(param.device, param.dtype).clone()
            else:
                param.grad.copy_(g)
        if self.optimizer is None:
            return
        optim = {k[len("optim."):]: v for k, v in state.items() if k.startswith("optim.")}
        if not optim:
            self.optimizer.state.pop(param, None)
            return
        # As torch's Optimizer.load_state_dict casts: floating state of the parameter's shape to its dtype and
        # device, the rest (Adam's step) to its device only.
        own = self.optimizer.state.setdefault(param, {})
        for key, value in optim.items():
            if torch.is_tensor(value):
                like = own.get(key)
                if torch.is_tensor(like) and like.shape == value.shape:
                    like.copy_(value)
                    continue
                if value.is_floating_point() and value.shape == param.shape:
                    value = value.to(param.device, param.dtype)
                elif key != "step":
                    value = value.to(param.device)
                own[key] = value.clone()
            else:
                own[key] = value


def access_of(optimizer: Any) -> StateAccess:
    """The ``StateAccess`` of ``optimizer``: a torch optimizer's (``TorchOptimizerState``; None: parameters and
    gradients alone), or ``optimizer`` itself when it is a route's ``StateAccess`` (``read``/``write``)."""
    if optimizer is None or isinstance(optimizer, torch.optim.Optimizer):
        return TorchOptimizerState(optimizer)
    if callable(getattr(optimizer, "read", None)) and callable(getattr(optimizer, "write", None)):
        return optimizer
    raise ValueError(f"optimizer={type(optimizer).__name__}: expected a torch.optim.Optimizer, a StateAccess "
                     "(read/write per parameter) or None (Megatron's optimizers: wrap them in "
                     "largeep_plugin.integrations.megatron.MegatronOptimizerState)")


# ---- packing ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Field:
    """One entry of a packed state: parameter ``index``, ``name`` in its ``State``, ``kind`` ("tensor",
    "number" for a Python float or int, "none"), and for a tensor its shape and dtype."""

    index: int
    name: str
    kind: str
    shape: tuple[int, ...] = ()
    dtype: str = ""

    @property
    def num_bytes(self) -> int:
        if self.kind == "tensor":
            return math.prod(self.shape) * _dtype(self.dtype).itemsize
        return 8 if self.kind == "number" else 0


@dataclass(frozen=True)
class Layout:
    """Where every entry of one expert's states sits in its packed buffer (the same on every rank of a route:
    all experts of a layer share their shapes and optimizer)."""

    fields: tuple[Field, ...]

    @property
    def num_bytes(self) -> int:
        return sum(f.num_bytes for f in self.fields)

    def signature(self) -> int:
        """A number that differs between layouts (ranks compare it before a move: a mismatch would mis-cut the
        buffers)."""
        return zlib.crc32(repr(self.fields).encode())   # not hash(): str hashes differ between processes


def layout_of(states: Sequence[State]) -> Layout:
    """The ``Layout`` of the states of one expert's parameters (in parameter order)."""
    fields = []
    for i, state in enumerate(states):
        for name in sorted(state):
            value = state[name]
            if value is None:
                fields.append(Field(i, name, "none"))
            elif torch.is_tensor(value):
                fields.append(Field(i, name, "tensor", tuple(value.shape), str(value.dtype).replace("torch.", "")))
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                fields.append(Field(i, name, "number", (), "int" if isinstance(value, int) else "float"))
            else:
                raise NotImplementedError(f"optimizer state {name}={value!r} of type {type(value).__name__} cannot "
                                          "be moved (tensors, numbers and None can)")
    return Layout(tuple(fields))


def pack(states: Sequence[State], layout: Layout, device: torch.device) -> torch.Tensor:
    """uint8 [B]: the states' bytes in ``layout`` order (tensors byte for byte, numbers as float64 or int64)."""
    parts = []
    for f in layout.fields:
        value = states[f.index][f.name]
        if f.kind == "tensor":
            parts.append(value.detach().to(device).contiguous().reshape(-1).view(torch.uint8))
        elif f.kind == "number":
            t = torch.tensor([value], dtype=torch.int64 if f.dtype == "int" else torch.float64, device=device)
            parts.append(t.view(torch.uint8))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8, device=device)


def unpack(buffer_B: torch.Tensor, layout: Layout, num_params: int) -> list[State]:
    """The states ``pack`` packed (tensors are views of ``buffer_B``: copy them before reusing it)."""
    out: list[State] = [{} for _ in range(num_params)]
    start = 0
    for f in layout.fields:
        n = f.num_bytes
        raw = buffer_B[start:start + n]
        start += n
        if f.kind == "tensor":
            out[f.index][f.name] = raw.view(_dtype(f.dtype)).view(f.shape)
        elif f.kind == "number":
            number = raw.view(torch.int64 if f.dtype == "int" else torch.float64)
            out[f.index][f.name] = int(number[0]) if f.dtype == "int" else float(number[0])
        else:
            out[f.index][f.name] = None
    return out


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)
