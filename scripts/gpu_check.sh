#!/usr/bin/env bash
# The checks that need a GPU (parity of every one-rank dispatch path in bf16/fp32, the host-sync budget under
# torch.cuda.set_sync_debug_mode("error"), expert GEMM TFLOP/s at hidden 8192 / FFN 32768, a profiler trace of the
# side stream's copies beside the expert GEMMs, Megatron's stock MoE against the large-EP layer at EP 1).
# Writes OUT/gpu_check.md and OUT/gpu_check.json; under 8 minutes on one H100/H200. Without a GPU only the
# CPU-checkable parts run, and the report says which were skipped.
#   bash scripts/gpu_check.sh [OUT]          (default OUT: runs/gpu_check)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
timeout 480 largeep gpu-check --out "$OUT"
