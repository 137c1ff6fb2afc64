"""DeepSpeed integration (deepspeed 0.19): ``initialize``, a drop-in for ``deepspeed.initialize`` driven by the
``"large_ep"`` section.

    engine.py      initialize, the bias-update and monitor hooks on the engine
    convert.py     stock ``deepspeed.moe.layer.MoE`` -> large-EP layers the engine still treats as MoE
    hf_blocks.py   Hugging Face MoE blocks (``largeep_plugin.hf``) made what the engine needs at each ZeRO stage
    placement.py   the section's placement and node layout under DeepSpeed's expert groups; checkpoint names
    stock.py       stand-in: stock DeepSpeed MoE with the plugin's seeded weights, the benchmarks' baseline
    training_state.py  the engine's per-parameter state (ZeRO 0-3) for moves; training-state save/load by expert
"""
from .engine import initialize, large_ep_section, update_large_ep_biases
from .training_state import DeepSpeedState, load_training_state, save_training_state

__all__ = ["initialize", "large_ep_section", "update_large_ep_biases", "DeepSpeedState", "save_training_state",
           "load_training_state"]
