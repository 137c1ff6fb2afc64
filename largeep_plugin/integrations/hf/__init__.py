"""Hugging Face Transformers MoE models with large expert parallelism (no DeepSpeed or Megatron needed).

    convert_model(model, ep_group=None, placement=None, allow_colocate=False, **overrides)   in place
    from_pretrained(path, ep_group=None, ...)   builds, converts, then reads only this rank's experts
    save_pretrained(model, path)                a checkpoint plain transformers loads (rank 0 writes)
    parallel_groups(ep_size), wrap_ddp(model), expert_parameters(model)   training with torchrun (training.py)
    weight_decay_groups(model, wd)              optimizer groups decaying what the unconverted model would
    clip_grad_norm_(model, max_norm)            the whole model's gradient norm (largeep_plugin.clip_grad_norm_)
    save_training_state / load_training_state   resume exactly, at this or another EP size (the core's,
                                                layer/training_state.py)

Files: families.py (the registry of supported blocks), block.py (the replacement block and its router-logits tap),
weights.py (the weight mapping), convert.py, generate.py (ranks stay together in ``generate``), checkpoint.py,
training.py (plain PyTorch: groups, DDP, weight-decay groups); bench.py and
tiny_models.py serve ``largeep bench hf`` and the examples (bench.py imports DeepSpeed too; nothing here imports
them).
"""
from largeep_plugin.layer.clip import clip_grad_norm_
from largeep_plugin.layer.training_state import load_training_state, save_training_state

from .checkpoint import from_pretrained, save_pretrained
from .convert import convert_model
from .families import FAMILIES
from .training import (ParallelGroups, ddp_ignored_names, expert_parameters, parallel_groups, unconverted_ndim,
                       weight_decay_groups, wrap_ddp)

__all__ = ["FAMILIES", "ParallelGroups", "clip_grad_norm_", "convert_model", "ddp_ignored_names", "expert_parameters",
           "from_pretrained", "load_training_state", "parallel_groups", "save_pretrained", "save_training_state",
           "unconverted_ndim", "weight_decay_groups", "wrap_ddp"]
