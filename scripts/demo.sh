#!/usr/bin/env bash
# The README's main job: install everything, fetch the demo corpus, then train a reversible model, its
# standard-residual twin and that twin with activation checkpointing, and compare their memory (revllm
# demo). Extra arguments go to `revllm demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/install.sh
bash scripts/assets.sh
. .venv/bin/activate
revllm demo "$@"
echo "demo.sh: done in $(( $(date +%s) - start )) s"
