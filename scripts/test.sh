#!/usr/bin/env bash
# Runs the linter and the test suite (slow tests excluded; run them with: scripts/test.sh -m slow).
# tests/interop/ compares exports with real SAELens in .venv-interop (built once, cached).
set -euo pipefail
source "$(dirname "$0")/_venv.sh" test
source "$(dirname "$0")/_interop_env.sh"
ruff check .
python -m pytest "$@"
