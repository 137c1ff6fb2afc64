"""``largeep_plugin.deepspeed``: a short name for ``largeep_plugin.adapters.deepspeed``.

The adapter is imported on first attribute access, so importing the core never imports deepspeed.
"""
from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    from .adapters import deepspeed as _adapter

    return getattr(_adapter, name)
