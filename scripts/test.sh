#!/usr/bin/env bash
# Install everything, then run the test suite (CPU; slow end-to-end checks included unless -m 'not slow').
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
# Two workers, one test file each at a time (--dist loadfile keeps a file's fixtures in one process): most
# tests are single-threaded or wait on subprocesses, so this halves the wall time on 2 cores.
exec python -m pytest -n "${REVLLM_TEST_WORKERS:-2}" --dist loadfile "$@"
