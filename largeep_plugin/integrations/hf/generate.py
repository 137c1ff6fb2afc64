"""``generate`` on a converted model: every rank stays in the layers' all-to-alls until all ranks are done.

Each forward of a large-EP layer is collective over its EP group. transformers' ``generate`` stops calling the
model on a rank once that rank's sequences are finished (an EOS, a stopping criterion), so with ranks that stop at
different lengths the others wait in an all-to-all nobody joins: a hang, then a collective timeout. Its
``synced_gpus=True`` is the cure: a finished rank keeps running forwards (and discards them) until every rank of the
world has finished. transformers turns it on by itself only under DeepSpeed ZeRO 3 or FSDP.

``keep_ranks_together_in_generate`` (called by ``convert_model``) gives the converted model an instance attribute
``generate`` that calls the class's own with ``synced_gpus=True`` whenever the world has more than one rank; an
explicit ``synced_gpus=False`` there is a ValueError saying why. One process, or a world of one: unchanged.
"""
from __future__ import annotations

import types
from typing import Any

import torch.distributed as dist
import torch.nn as nn


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _synced_generate(self: nn.Module, *args: Any, synced_gpus: bool | None = None, **kwargs: Any) -> Any:
    """``generate`` of the model's class, with ``synced_gpus=True`` when the world has several ranks."""
    if _world_size() > 1:
        if synced_gpus is False:
            raise ValueError(
                "generate(synced_gpus=False) on a model with large-EP layers: each layer's forward is collective "
                "over its EP group, so a rank that finished its sequences must keep running forwards until every "
                "rank has (synced_gpus=True, the default here); otherwise the others wait in an all-to-all forever")
        synced_gpus = True
    return type(self).generate(self, *args, synced_gpus=synced_gpus, **kwargs)


def keep_ranks_together_in_generate(model: nn.Module) -> None:
    """Give ``model`` (a transformers model with ``generate``) the synced ``generate`` of the module docstring;
    nothing for a model without one. A bound method: ``copy.deepcopy`` binds it to the copy."""
    if callable(getattr(type(model), "generate", None)):
        model.generate = types.MethodType(_synced_generate, model)
