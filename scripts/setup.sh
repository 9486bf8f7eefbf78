#!/usr/bin/env bash
# Sets up everything on a fresh machine: a virtual environment in .venv with PyTorch (CPU build),
# Triton, the test and benchmark tools, and mllm_kernels compiled from source (editable).
# Safe to run again: it reuses .venv and rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first, pinned: this version lies on local disk as a CPU build; an unpinned torch would
# pull a multi-GB CUDA build.
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -r requirements-dev.txt
# --no-build-isolation: compile against the torch installed above, not a freshly fetched one.
MAX_JOBS=${MAX_JOBS:-2} python -m pip install --quiet --no-build-isolation -e .
python -c "import mllm_kernels, torch; print('mllm_kernels ready: torch', torch.__version__, '| backends', mllm_kernels.available_backends())"
