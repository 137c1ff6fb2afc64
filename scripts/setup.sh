#!/usr/bin/env bash
# Set up largeep_plugin on a fresh machine: torch (the CPU build when none is installed), then the package with
# all extras (megatron-core, deepspeed, transformers, torchtitan's dependencies, test tools), then torchtitan itself
# without its own dependency list (setup.py says why). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    # A plain `pip install torch` would pull a multi-GB CUDA build; the CPU wheel is pinned here.
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[all]"
"$PY" -m pip install --quiet --no-deps "torchtitan==0.3.0"
"$PY" -c "import torch, largeep_plugin; print(f'largeep_plugin ready (torch {torch.__version__})')"
