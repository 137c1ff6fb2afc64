"""Count, on CPU, what would make the host wait for a GPU in a forward or backward pass.

A GPU runs ahead of the host only while the host never asks it for a number. On CPU nothing waits, so the test
counts the operators that *would* wait on CUDA, with a ``TorchDispatchMode``:

* ``nonzero``, ``bincount`` (which asks for the largest id), ``masked_select``, ``unique``, ``equal``, ``.item()``
  (``_local_scalar_dense``), indexing with a boolean mask (a hidden ``nonzero``), ``repeat_interleave`` with tensor
  repeats and no ``output_size``;
* ``Tensor.tolist()`` (it does not dispatch on CPU, so it is wrapped here);
* the layer's one deliberate read-back, ``comm.read_back``, counted on its own.

Tensors made from host data (``torch.tensor(list)``: ``lift_fresh``) and everything computed only from them are
host tensors, as they would be next to a GPU: reading them costs nothing and is not counted. ``torch.tensor(list,
device=...)`` cannot be told apart on CPU; the hot path has none (it takes device counts from the count exchange).
"""
from __future__ import annotations

import collections
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import largeep_plugin.layer.comm as comm

SYNC_OPS = {"nonzero", "bincount", "_local_scalar_dense", "masked_select", "unique", "_unique2", "unique_dim",
            "unique_consecutive", "equal", "is_nonzero"}


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _is_host(t: torch.Tensor) -> bool:
    return bool(getattr(t, "_host_data", False))


class SyncCounter(TorchDispatchMode):
    """``with SyncCounter() as c: ...`` then ``c.counts`` ({operator: times}), ``c.read_backs``, and
    ``c.read_back_places``: the value of ``c.place`` (set by the caller, e.g. a stage name) at each read-back."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.read_backs = 0
        self.place = ""
        self.read_back_places: list[str] = []
        self._in_read_back = False

    def __enter__(self) -> "SyncCounter":
        self._tolist, self._read_back = torch.Tensor.tolist, comm.read_back
        counter = self

        def tolist(t: torch.Tensor) -> Any:
            if not counter._in_read_back and not _is_host(t):
                counter.counts["tolist"] += 1
            return counter._tolist(t)

        def read_back(t: torch.Tensor) -> list[int]:
            counter.read_backs += 1
            counter.read_back_places.append(counter.place)
            counter._in_read_back = True
            try:
                return counter._read_back(t)
            finally:
                counter._in_read_back = False

        torch.Tensor.tolist = tolist  # type: ignore[method-assign]
        comm.read_back = read_back
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.Tensor.tolist = self._tolist  # type: ignore[method-assign]
        comm.read_back = self._read_back
        super().__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        inputs = _tensors((args, kwargs))
        out = func(*args, **kwargs)
        if name == "lift_fresh" or (inputs and all(_is_host(t) for t in inputs)):
            for t in _tensors(out):
                t._host_data = True
            return out
        if self._in_read_back:
            return out
        if name in SYNC_OPS:
            self.counts[name] += 1
        elif name == "repeat_interleave" and func._overloadname != "self_int" and kwargs.get("output_size") is None:
            self.counts[name] += 1
        elif name in ("index", "index_put", "index_put_") and any(
                i is not None and i.dtype == torch.bool for i in args[1]):
            self.counts[f"{name}[bool mask]"] += 1
        return out
