"""``largeep_plugin.hf``: a short name for ``largeep_plugin.integrations.hf`` (Hugging Face Transformers).

The integration is imported on first attribute access, so importing the core never imports transformers.
"""
from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    from largeep_plugin.integrations import hf as _integration

    return getattr(_integration, name)
