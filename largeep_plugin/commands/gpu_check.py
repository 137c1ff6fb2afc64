"""``largeep gpu-check``: the checks that need a GPU, in one run (``scripts/gpu_check.sh``): a markdown and a JSON
report.

    largeep gpu-check --out runs/gpu_check          # on a machine with one CUDA GPU; under 8 minutes

Sections (each guarded: a failure is reported, the others still run):
    parity      every dispatch path that one rank can run (flat, capacity, chunked overlap; four experts colocated
                on the one rank, top-2, so the permutation, the slot grouping and the all-to-all code really run)
                in bf16 and fp32 against the dense fp32 reference, forward and backward, NCCL world of one
    sync        the same forwards and backwards under ``torch.cuda.set_sync_debug_mode("error")``, the count
                exchange's one read-back excepted: any other host sync raises
    gemm        the expert MLP at the source design's shape (hidden 8192, FFN 32768, bf16): TFLOP/s against the
                GPU's peak
    overlap     a profiler trace of the chunked pipeline: time the side stream's copies overlap the expert GEMMs
    megatron    Megatron's stock MoELayer (all-to-all dispatcher, SequentialMLP) against LargeEPMoELayer at EP 1 on
                the same config: tokens/s of forward + backward
    hf          ``largeep bench hf`` on the GPU at EP 1, eight experts colocated on it: the Hugging Face model
                unconverted, under DeepSpeed's AutoEP, large-EP and large-EP with dynamic replicas, uniform and
                learned routers, wall clock and critical path (a subprocess; its JSON beside the report)

Without CUDA only ``parity`` and ``sync`` run, on the CPU with gloo (the sync budget then counted by operator, as
``tests/test_sync_budget.py`` does), and the report says which sections were skipped and why.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import traceback
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist

# bf16 dense peak of the GPUs this project meets (TFLOP/s, no sparsity).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12))


def _one_rank_layer(overrides: dict[str, Any], device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    from largeep_plugin import LargeEPConfig, LargeEPMoE, Placement, Topology
    from largeep_plugin.layer.reference import DenseMoEReference

    cfg = LargeEPConfig(**{**dict(hidden_size=64, ffn_hidden_size=128, num_experts=4, top_k=2, activation="swiglu",
                                  score_function="sigmoid", init_std=0.2), **overrides})
    placement = Placement(topology=Topology.uniform(1, 1), num_experts=4, rank_to_experts=((0, 1, 2, 3),))
    layer = LargeEPMoE(cfg, placement=placement).to(device=device, dtype=dtype)
    ref = DenseMoEReference(cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(dtype).float())  # the weights the layer holds, exactly
    return layer, ref


PATHS = {"flat": {}, "capacity": {"capacity_factor": 1.0}, "chunked": {"overlap_chunks": 2}}


def check_parity(device: torch.device) -> dict[str, Any]:
    """Relative max errors of y, dx and the router gradient per (path, dtype)."""
    out: dict[str, Any] = {}
    for name, overrides in PATHS.items():
        for dtype in (torch.bfloat16, torch.float32):
            layer, ref = _one_rank_layer(overrides, device, dtype)
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(512, 64, generator=gen).to(dtype)
            g = torch.randn(512, 64, generator=gen).to(dtype)
            x_dev = x.to(device).clone().requires_grad_(True)
            (layer(x_dev).float() * g.to(device).float()).sum().backward()
            x_ref = x.float().clone().requires_grad_(True)
            y_ref = ref(x_ref)
            (y_ref * g.float()).sum().backward()
            with torch.no_grad():
                y = layer(x.to(device)).float().cpu()
            tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
            errs = {"y": _rel(y, y_ref), "dx": _rel(x_dev.grad.cpu(), x_ref.grad),
                    "router": _rel(layer.router.weight.grad.cpu(), ref.router.weight.grad)}
            out[f"{name}/{str(dtype).split('.')[-1]}"] = {**errs, "ok": all(v <= tol for v in errs.values())}
    return {**out, "ok": all(v["ok"] for v in out.values())}


def check_sync(device: torch.device) -> dict[str, Any]:
    """Forward + backward of every path with any host sync but the count exchange's read-back an error."""
    import largeep_plugin.layer.comm as comm

    out: dict[str, Any] = {}
    real = comm.read_back
    reads = []

    def allowed(t: torch.Tensor) -> list[int]:
        reads.append(1)
        if device.type != "cuda":
            return real(t)
        torch.cuda.set_sync_debug_mode("default")
        try:
            return real(t)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    comm.read_back = allowed
    try:
        for name, overrides in PATHS.items():
            layer, _ = _one_rank_layer(overrides, device, torch.bfloat16)
            x = torch.randn(512, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
            layer(x).float().sum().backward()  # warm-up
            reads.clear()
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("error")
            try:
                layer(x).float().sum().backward()
                out[name] = {"read_backs": len(reads), "ok": len(reads) == 1}
            except RuntimeError as err:
                out[name] = {"error": str(err).splitlines()[0], "ok": False}
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
    finally:
        comm.read_back = real
    return {**out, "ok": all(v["ok"] for v in out.values())}


def check_gemm(device: torch.device, rows: int = 4096) -> dict[str, Any]:
    """The expert MLP at hidden 8192, FFN 32768, bf16 (SwiGLU: fc1 is [2F, H]): forward TFLOP/s."""
    from largeep_plugin.layer.config import LargeEPConfig
    from largeep_plugin.layer.experts import ExpertMLP

    cfg = LargeEPConfig(hidden_size=8192, ffn_hidden_size=32768, num_experts=1, top_k=1, activation="swiglu")
    expert = ExpertMLP(cfg.expert_config, expert_id=0).to(device=device, dtype=torch.bfloat16)
    x = torch.randn(rows, 8192, device=device, dtype=torch.bfloat16)
    flops = 2 * rows * 8192 * 32768 * 3  # fc1 (gate and up) and fc2
    with torch.no_grad():
        for _ in range(3):
            expert(x)
        torch.accelerator.synchronize(device)
        t0 = time.perf_counter()
        n = 10
        for _ in range(n):
            expert(x)
        torch.accelerator.synchronize(device)
    tflops = flops * n / (time.perf_counter() - t0) / 1e12
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return {"device": name, "tflops": tflops, "peak_tflops": peak, "fraction_of_peak": tflops / peak if peak else None,
            "ok": True}


def check_overlap(device: torch.device, out_dir: str) -> dict[str, Any]:
    """Profile the chunked pipeline (4 chunks) and measure how long side-stream copies run beside GEMMs."""
    from torch.profiler import ProfilerActivity, profile

    layer, _ = _one_rank_layer({"overlap_chunks": 4, "hidden_size": 2048, "ffn_hidden_size": 8192}, device,
                               torch.bfloat16)
    x = torch.randn(16384, 2048, device=device, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()
    torch.accelerator.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        layer(x).float().sum().backward()
        torch.accelerator.synchronize(device)
    path = os.path.join(out_dir, "overlap_trace.json")
    prof.export_chrome_trace(path)
    with open(path, encoding="utf-8") as f:
        events = json.load(f)["traceEvents"]
    spans: dict[str, list[tuple[float, float, int]]] = {"copy": [], "gemm": []}
    for e in events:
        name, args = str(e.get("name", "")).lower(), e.get("args", {})
        if e.get("ph") != "X" or "stream" not in args:
            continue
        kind = "gemm" if ("gemm" in name or "cutlass" in name or "sm90" in name) else (
            "copy" if ("memcpy" in name or "copy" in name) else None)
        if kind:
            spans[kind].append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), int(args["stream"])))
    overlap = sum(max(0.0, min(b1, b2) - max(a1, a2)) for a1, b1, s1 in spans["copy"] for a2, b2, s2 in spans["gemm"]
                  if s1 != s2)
    copy_time = sum(b - a for a, b, _ in spans["copy"])
    return {"trace": path, "copy_us": copy_time, "copy_overlapping_gemm_us": overlap,
            "overlapped_fraction": overlap / copy_time if copy_time else None,
            "ok": overlap > 0}


def check_megatron(device: torch.device) -> dict[str, Any]:
    """Stock MoELayer (all-to-all dispatcher) against LargeEPMoELayer at EP 1, fwd + bwd tokens/s."""
    from largeep_plugin.integrations.megatron.stock import stock_vs_large_ep

    return {**stock_vs_large_ep(device, _all_on_one), "ok": True}


def check_hf(out_dir: str, timeout: float = 240.0) -> dict[str, Any]:
    """``largeep bench hf`` at EP 1 with 8 experts on the GPU (a process of its own: it starts its own world)."""
    import subprocess
    import sys

    folder = os.path.join(out_dir, "bench_hf")
    cmd = [sys.executable, "-m", "largeep_plugin.cli", "bench", "hf", "--ep", "1", "--num-experts", "8", "--device",
           "cuda", "--hidden-size", "1024", "--ffn-hidden-size", "2048", "--batch-size", "8", "--seq-len", "512",
           "--learn-steps", "100", "--iters", "3", "--warmup", "1", "--out", folder]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"ok": False, "error": f"bench hf exited {proc.returncode}", "output": proc.stdout[-4000:] +
                proc.stderr[-4000:]}
    with open(os.path.join(folder, "hf_bench.json"), encoding="utf-8") as f:
        rows = json.load(f)["rows"]
    keep = ("router", "variant", "tokens_per_s_per_rank", "critical_tokens_per_s", "vs_autoep_critical", "peak_mib")
    return {"ok": True, "rows": [{k: r.get(k) for k in keep} for r in rows], "table": proc.stdout[-4000:]}


def _all_on_one(num_experts: int) -> Any:
    from largeep_plugin import Placement, Topology

    return Placement(topology=Topology.uniform(1, 1), num_experts=num_experts,
                     rank_to_experts=(tuple(range(num_experts)),))


def _run(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        result = fn()
    except Exception as err:  # a section that fails is reported; the others still run
        result = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{name}: {'ok' if result.get('ok') else 'FAILED' if 'skipped' not in result else 'skipped'}"
          f" ({result['seconds']} s)", flush=True)
    return result


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# GPU check ({report['device']})", ""]
    for section, result in report["sections"].items():
        status = "skipped: " + result["skipped"] if "skipped" in result else ("ok" if result.get("ok") else "FAILED")
        lines += [f"## {section}: {status}", "", "```", json.dumps({k: v for k, v in result.items()
                                                                     if k != "traceback"}, indent=1), "```", ""]
    return "\n".join(lines)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("gpu-check", help="the checks that need a GPU (parity, sync budget, GEMM TFLOP/s, "
                              "overlap trace, Megatron stock vs large-EP); CPU parts only without one",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu_check", help="directory of gpu_check.md and gpu_check.json "
                   "(default runs/gpu_check)")
    return p


def run(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore", message="LargeEPMoE: .* experts on")  # colocation is the point here
    os.makedirs(args.out, exist_ok=True)
    # Device-generic where torch has it (torch.accelerator); the sync debug mode and the device name are CUDA's own.
    accel = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    cuda = accel is not None and accel.type == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    if cuda:
        torch.accelerator.set_device_index(device.index)
    no_gpu = {"skipped": "no CUDA device", "ok": True}
    sections = {
        "parity": _run("parity", lambda: check_parity(device)),
        "sync": _run("sync", lambda: check_sync(device)),
        "gemm": _run("gemm", lambda: check_gemm(device)) if cuda else no_gpu,
        "overlap": _run("overlap", lambda: check_overlap(device, args.out)) if cuda else no_gpu,
        "megatron": _run("megatron", lambda: check_megatron(device)) if cuda else no_gpu,
        "hf": _run("hf", lambda: check_hf(args.out)) if cuda else no_gpu,
    }
    report = {"device": torch.cuda.get_device_name(device) if cuda else "CPU (no CUDA device)",
              "torch": torch.__version__, "sections": sections}
    with open(os.path.join(args.out, "gpu_check.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "gpu_check.md"), "w", encoding="utf-8") as f:
        f.write(markdown(report))
    dist.destroy_process_group()
    print(f"written {args.out}/gpu_check.md and gpu_check.json")
    return 0 if all(s.get("ok") for s in sections.values()) else 1

