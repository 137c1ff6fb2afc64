"""``largeep_plugin.megatron``: a short name for ``largeep_plugin.integrations.megatron``.

The integration is imported on first attribute access, so importing the core never imports megatron.
"""
from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    from largeep_plugin.integrations import megatron as _integration

    return getattr(_integration, name)
