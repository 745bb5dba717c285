#!/usr/bin/env bash
# Runs the linter and the test suite (slow tests excluded; run them with: scripts/test.sh -m slow).
set -euo pipefail
source "$(dirname "$0")/_venv.sh" test
ruff check .
python -m pytest "$@"
