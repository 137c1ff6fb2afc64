"""The torchtitan override: every ``MoE.Config`` of the model becomes a large-EP MoE.

Switched on in a torchtitan run with the one flag

    --override.imports largeep_plugin.integrations.torchtitan.override.large_ep

(plugin-only ``LargeEPConfig`` fields ride along as JSON: ``'...override.large_ep={"overlap_chunks": 2}'``).
torchtitan imports this module, which registers ``large_ep`` with ``@override``, and applies it to the config tree
after ``update_from_config`` and before anything is built (``torchtitan/config/override.py``). A setting the layer
cannot take fails there, naming it.
"""
from __future__ import annotations

from typing import Any

from torchtitan.config import override
from torchtitan.models.common.moe import MoE

from .moe import LargeEPTitanMoE, replace_config

FLAG = "--override.imports largeep_plugin.integrations.torchtitan.override.large_ep"


@override(target=MoE.Config, description="largeep_plugin: large expert parallelism for the MoE layers")
def large_ep(cfg: MoE.Config, **large_ep_fields: Any) -> LargeEPTitanMoE.Config:
    """The replacement of one ``MoE.Config``: its fields, plus the plugin-only ``LargeEPConfig`` fields given."""
    if isinstance(cfg, LargeEPTitanMoE.Config):
        return cfg   # already ours
    return replace_config(cfg, large_ep_fields)
