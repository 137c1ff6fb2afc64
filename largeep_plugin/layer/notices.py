"""Warnings about a whole run, shown once per world: by global rank 0, the first time, without a source line.

A setting that every rank shares (a colocated placement, say) would otherwise be warned about by every rank and
every layer, each with the line of the plugin that raised it. ``warn_once`` keys each warning by what it is about;
other ranks stay silent (they share the setting), and ``warnings.warn_explicit`` with a file name that is no file
keeps the message alone on its line, while filters (``-W``, ``warnings.catch_warnings``) still apply.
"""
from __future__ import annotations

import warnings
from typing import Hashable

import torch.distributed as dist

_SHOWN: set[Hashable] = set()


def warn_once(message: str, key: Hashable, category: type[Warning] = UserWarning) -> bool:
    """Warn ``message`` on global rank 0 (the only process without torch.distributed) unless ``key`` was warned
    about before in this process. Returns whether this call warned."""
    if key in _SHOWN:
        return False
    _SHOWN.add(key)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return False
    warnings.warn_explicit(message, category, filename="largeep", lineno=0, module="largeep_plugin")
    return True
