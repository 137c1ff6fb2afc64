"""Placeholder: from_pretrained and save_pretrained come in the next commit."""
from typing import Any


def from_pretrained(*args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError("largeep_plugin.hf.from_pretrained is not implemented yet")


def save_pretrained(*args: Any, **kwargs: Any) -> None:
    raise NotImplementedError("largeep_plugin.hf.save_pretrained is not implemented yet")
