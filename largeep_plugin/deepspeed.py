"""``largeep_plugin.deepspeed``: a short name for ``largeep_plugin.integrations.deepspeed``.

The integration is imported on first attribute access, so importing the core never imports deepspeed.
"""
from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    from largeep_plugin.integrations import deepspeed as _integration

    return getattr(_integration, name)
