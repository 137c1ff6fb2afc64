"""torchtitan's ``ParallelDims`` on CPU ranks (gloo): a stand-in for tests and the CPU example.

torchtitan builds its meshes on ``torchtitan.tools.utils.device_type``, which is ``"cuda"`` when no accelerator is
found (``tools/utils.py``: ``_get_available_device_type() or "cuda"``), so ``ParallelDims.build_mesh`` fails on a
CPU-only machine (``init_device_mesh("cuda")``: ``torch._C`` has no ``_cuda_setDevice``). Here the same
``build_mesh`` runs with the device type ``"cpu"`` for the duration of the call; the meshes it builds, with all
their sub-meshes (``ep``, ``efsdp``, ``fsdp``, ``loss``...), are torchtitan's own, on gloo.
"""
from __future__ import annotations

import torch.distributed as dist
import torchtitan.distributed.parallel_dims as parallel_dims_module
from torchtitan.distributed import ParallelDims
from torchtitan.distributed import utils as dist_utils


def cpu_parallel_dims(*, ep: int, dp_shard: int = -1, dp_replicate: int = 1,
                      spmd_backend: str = "partial_dtensor") -> ParallelDims:
    """torchtitan's ``ParallelDims`` for this gloo world (tp = cp = pp = 1), meshes built on the CPU.

    ``spmd_backend`` is set for torchtitan's runtime too (``distributed.utils.set_spmd_backend``), as its trainer
    does: ``"partial_dtensor"`` (DTensors on the model-parallel axes only) is what runs eagerly on CPU ranks.
    """
    if not dist.is_initialized():
        raise ValueError("cpu_parallel_dims needs torch.distributed initialised (gloo)")
    dims = ParallelDims(dp_replicate=dp_replicate, dp_shard=dp_shard, cp=1, tp=1, pp=1, ep=ep,
                        world_size=dist.get_world_size(), spmd_backend=spmd_backend)
    dist_utils.set_spmd_backend(spmd_backend)
    saved = parallel_dims_module.device_type
    parallel_dims_module.device_type = "cpu"
    try:
        dims.build_mesh()
    finally:
        parallel_dims_module.device_type = saved
    return dims
