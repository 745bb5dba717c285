#!/usr/bin/env bash
# Runs the linter and the test suite (slow tests excluded; run them with: scripts/test.sh -m slow).
# The core suite runs in .venv (no torch). .venv-interop (built once, cached) holds PyTorch:
# tests/interop/ compare exports with real SAELens there, and tests/lm/ (the extra `lm`) run there.
# Arguments go to pytest; test paths given are each run in the environment they need.
set -euo pipefail
source "$(dirname "$0")/_venv.sh" test
source "$(dirname "$0")/_interop_env.sh"
ruff check .
core=() lm=() opts=()
for arg in "$@"; do
  if [[ "$arg" != -* && -e "$arg" ]]; then
    case "$(realpath "$arg")" in
      "$JAXSAE_ROOT"/tests/lm*) lm+=("$arg") ;;
      *) core+=("$arg") ;;
    esac
  else
    opts+=("$arg")
  fi
done
if (( ${#core[@]} + ${#lm[@]} == 0 )); then
  python -m pytest "${opts[@]}"
  "$JAXSAE_INTEROP_PYTHON" -m pytest tests/lm "${opts[@]}"
else
  if (( ${#core[@]} )); then python -m pytest "${core[@]}" "${opts[@]}"; fi
  if (( ${#lm[@]} )); then "$JAXSAE_INTEROP_PYTHON" -m pytest "${lm[@]}" "${opts[@]}"; fi
fi
