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
# DeepSpeed 0.19.8's AutoEP runs with transformers <= 5.22.2 only, while this environment keeps the newest (what
# the Hugging Face integration is tested against). A second environment over this one (every package seen through
# --system-site-packages, transformers 5.22.2 over them) lets `largeep bench hf` show AutoEP: it runs itself there.
if [ ! -x .venv-autoep/bin/python ]; then
    "$PY" -m venv --system-site-packages .venv-autoep
fi
.venv-autoep/bin/python -m pip install --quiet "transformers==5.22.2"
"$PY" -c "import torch, largeep_plugin; print(f'largeep_plugin ready (torch {torch.__version__})')"
