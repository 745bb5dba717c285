#!/usr/bin/env bash
# Runs the linter and the test suite (slow tests excluded; run them with: scripts/test.sh -m slow).
# The core suite runs in .venv (no torch). .venv-interop (built once, cached) holds PyTorch:
# tests/interop/ compare exports with real SAELens there, and tests/lm/ (the extra `lm`) run there.
set -euo pipefail
source "$(dirname "$0")/_venv.sh" test
source "$(dirname "$0")/_interop_env.sh"
ruff check .
python -m pytest "$@"
"$JAXSAE_INTEROP_PYTHON" -m pytest tests/lm "$@"
