"""The layer on one CUDA GPU with NCCL (world size 1) against the dense fp32 reference on the CPU.

bf16 is compared with a bf16 tolerance (relative max-norm error 3e-2) after giving the reference the same
bf16-rounded weights and inputs, so only the arithmetic differs; fp32 with 1e-4 (GPU and CPU reduce in different
orders). One expert, so the layer is placement-free at world size 1; sigmoid scores without normalisation keep
the combine weight (and so the router gradient) non-trivial.

The rank runs in a spawned process: the pytest process has asked CUDA whether it is there, and a forked child
must not inherit that.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from conftest import gpu, rel_err
from largeep_plugin.layer.config import LargeEPConfig
from largeep_plugin.tools.launch import run_world
from largeep_plugin.layer.moe_layer import LargeEPMoE
from largeep_plugin.layer.reference import DenseMoEReference

pytestmark = [pytest.mark.gpu, gpu]

TOLERANCE = {torch.bfloat16: 3e-2, torch.float32: 1e-4}


def _gpu_rank(rank: int, world_size: int) -> dict[str, dict[str, float]]:
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    probe = torch.ones(1, device=dev)
    dist.all_reduce(probe)  # NCCL really carries a collective on this device
    out: dict[str, dict[str, float]] = {"nccl": {"backend_is_nccl": float(dist.get_backend() == "nccl")}}
    for activation in ("gelu", "swiglu"):
        for dtype in (torch.bfloat16, torch.float32):
            cfg = LargeEPConfig(
                hidden_size=64, ffn_hidden_size=128, num_experts=1, top_k=1, activation=activation,
                score_function="sigmoid", normalize_topk=False, init_std=0.2, linear_bias=activation == "gelu",
            )
            out[f"{activation}-{str(dtype).split('.')[-1]}"] = _compare(cfg, dtype, dev)
    return out


def _compare(cfg: LargeEPConfig, dtype: torch.dtype, dev: torch.device) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 64, cfg.hidden_size, generator=gen)).to(dtype)
    g = torch.randn(4, 64, cfg.hidden_size, generator=gen).to(dtype)

    layer = LargeEPMoE(cfg).to(device=dev, dtype=dtype)
    ref = DenseMoEReference(cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(dtype).float())  # the weights the layer holds, exactly
    x_dev = x.to(dev).clone().requires_grad_(True)
    y = layer(x_dev)
    (y.float() * g.to(dev).float()).sum().backward()

    x_ref = x.float().clone().requires_grad_(True)
    y_ref = ref(x_ref)
    (y_ref * g.float()).sum().backward()

    errs = {
        "y": rel_err(y.float().cpu(), y_ref),
        "dx": rel_err(x_dev.grad.float().cpu(), x_ref.grad),
        "router": rel_err(layer.router.weight.grad.float().cpu(), ref.router.weight.grad),
        "dtype_ok": float(y.dtype == dtype and y.device.type == "cuda"),
    }
    for name, p in layer.expert.named_parameters():
        errs[f"expert.{name}"] = rel_err(p.grad.float().cpu(), dict(ref.experts[0].named_parameters())[name].grad)
    return errs


def test_gpu_layer_matches_reference_bf16_and_fp32() -> None:
    if not dist.is_nccl_available():
        pytest.skip("torch was built without NCCL")
    (results,) = run_world(_gpu_rank, 1, backend="nccl", start_method="spawn", timeout=300)
    assert results.pop("nccl") == {"backend_is_nccl": 1.0}
    for case, errs in results.items():
        assert errs.pop("dtype_ok") == 1.0, case
        tol = TOLERANCE[torch.bfloat16 if case.endswith("bfloat16") else torch.float32]
        bad = {k: v for k, v in errs.items() if not v <= tol}
        assert not bad, f"{case}: relative error above {tol}: {bad} (all: {errs})"
