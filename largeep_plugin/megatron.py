"""``largeep_plugin.megatron``: a short name for ``largeep_plugin.adapters.megatron``.

The adapter is imported on first attribute access, so importing the core never imports megatron.
"""
from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    from .adapters import megatron as _adapter

    return getattr(_adapter, name)
