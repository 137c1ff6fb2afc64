"""torchtitan (0.3.0): its MoE layers run by ``LargeEPMoE`` on torchtitan's EP mesh, through its override mechanism.

    --override.imports largeep_plugin.integrations.torchtitan.override.large_ep     the one flag (override.py)

Files: mapping.py (torchtitan's ``MoE.Config`` -> ``LargeEPConfig``, refusals), moe.py (``LargeEPTitanMoE``: the
module in torchtitan's MoE slot), state_dict.py (torchtitan's checkpoint names and layouts, both ways),
override.py (the ``@override`` factory), cpu.py (torchtitan's meshes on CPU ranks, for tests and the example).
"""
from .mapping import largeep_config
from .moe import LargeEPTitanMoE, replace_config

__all__ = ["LargeEPTitanMoE", "largeep_config", "replace_config"]
