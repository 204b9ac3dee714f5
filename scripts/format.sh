#!/usr/bin/env bash
# Format the whole tree and apply ruff's safe fixes (rules: [tool.ruff] in pyproject.toml). CI checks that
# both leave nothing to do (.ci/run: `ruff check` and `ruff format --check`). Needs the dev extra (ruff).
set -euo pipefail
cd "$(dirname "$0")/.."
RUFF=ruff
[ -x .venv/bin/ruff ] && RUFF=.venv/bin/ruff
"$RUFF" format .
"$RUFF" check --fix .
