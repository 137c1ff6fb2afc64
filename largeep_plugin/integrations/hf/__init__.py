"""Hugging Face Transformers MoE models with large expert parallelism (no DeepSpeed or Megatron needed).

    convert_model(model, ep_group=None, placement=None, allow_colocate=False, **overrides)   in place
    from_pretrained(path, ep_group=None, ...)   builds, converts, then reads only this rank's experts
    save_pretrained(model, path)                a checkpoint plain transformers loads (rank 0 writes)
    parallel_groups(ep_size), wrap_ddp(model), expert_parameters(model)   training with torchrun (training.py)
    save_training_state(path, model, optimizer), load_training_state(path, model, optimizer)   resume at any EP
                                                size (the core's, layer/training_state.py)

Files: families.py (the registry of supported blocks), block.py (the replacement block and its router-logits tap),
weights.py (the weight mapping), convert.py, checkpoint.py, training.py (plain PyTorch: groups, DDP); bench.py and
tiny_models.py serve ``largeep bench hf`` and the examples (bench.py imports DeepSpeed too; nothing here imports
them).
"""
from .checkpoint import from_pretrained, save_pretrained
from .convert import convert_model
from .families import FAMILIES
from largeep_plugin.layer.training_state import load_training_state, save_training_state

from .training import ParallelGroups, ddp_ignored_names, expert_parameters, parallel_groups, wrap_ddp

__all__ = ["FAMILIES", "ParallelGroups", "convert_model", "ddp_ignored_names", "expert_parameters", "from_pretrained",
           "load_training_state", "parallel_groups", "save_pretrained", "save_training_state", "wrap_ddp"]
