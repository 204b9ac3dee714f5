#!/usr/bin/env bash
# Install everything, then run the test suite (CPU; slow end-to-end checks included unless -m 'not slow').
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
exec python -m pytest "$@"
