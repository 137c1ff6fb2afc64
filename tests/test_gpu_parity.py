"""The layer on one CUDA GPU with NCCL (world size 1) against the dense fp32 reference on the CPU, and its host-sync
budget under ``torch.cuda.set_sync_debug_mode("error")``: the parity and sync sections of ``largeep gpu-check``.

Four experts colocated on the one rank, top-2, so the permutation by slot, the count exchange, the grouping of
rows by expert and the combine all run (a single expert would skip them); flat, with capacity, and through the
chunked overlap pipeline. bf16 is compared with a bf16 tolerance (relative max error 3e-2) after giving the
reference the same bf16-rounded weights and inputs; fp32 with 1e-4.

The rank runs in a spawned process: the pytest process has asked CUDA whether it is there, and a forked child
must not inherit that.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from conftest import gpu
from largeep_plugin.tools.launch import run_world

pytestmark = [pytest.mark.gpu, gpu]


def _gpu_rank(rank: int, world_size: int) -> dict[str, Any]:
    from largeep_plugin.commands.gpu_check import check_parity, check_sync

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    return {"nccl": dist.get_backend() == "nccl", "parity": check_parity(dev), "sync": check_sync(dev)}


def test_gpu_layer_matches_reference_and_syncs_once() -> None:
    if not dist.is_nccl_available():
        pytest.skip("torch was built without NCCL")
    (results,) = run_world(_gpu_rank, 1, backend="nccl", start_method="spawn", timeout=300)
    assert results["nccl"]
    assert results["parity"]["ok"], results["parity"]
    assert results["sync"]["ok"], results["sync"]
