#!/usr/bin/env bash
# Runs the linter and the test suite (slow tests excluded; run them with: scripts/test.sh -m slow).
# The core suite runs in .venv, which has no torch. .venv-interop, the PyTorch environment
# (jaxsae[lm] + SAELens; built once, in the background while the core suite runs), runs
# tests/interop/ (exports against real SAELens) and tests/lm/ (jaxsae cache, eval --model).
# Arguments go to pytest; test paths given are each run in the environment they need. Tests run
# on up to 4 cores (pytest-xdist; pass -n 0 for one process).
set -euo pipefail
source "$(dirname "$0")/_venv.sh" test
build_log=".venv-interop.build.log"
(source scripts/_interop_env.sh) > "$build_log" 2>&1 &
build=$!
core=() torch=() opts=()
for arg in "$@"; do
  if [[ "$arg" != -* && -e "$arg" ]]; then
    case "$(realpath "$arg")" in
      "$JAXSAE_ROOT"/tests/lm* | "$JAXSAE_ROOT"/tests/interop*) torch+=("$arg") ;;
      *) core+=("$arg") ;;
    esac
  else
    opts+=("$arg")
  fi
done
if (( ${#core[@]} + ${#torch[@]} == 0 )); then
  core=(--ignore=tests/interop --ignore=tests/lm)
  torch=(tests/interop tests/lm)
fi
# Tests run in parallel, one worker per core up to 4 (pytest-xdist), unless -n / -p no:xdist
# is given.
if [[ " ${opts[*]-} " != *" -n"* && " ${opts[*]-} " != *"--numprocesses"* &&
      " ${opts[*]-} " != *"no:xdist"* ]]; then
  workers=$(( $(nproc) < 4 ? $(nproc) : 4 ))
  if (( workers > 1 )); then opts+=(-n "$workers"); fi
fi
opts+=(-rs)  # the reason of every skipped test, in the log
status=0
pytest_in() {  # pytest exits 5 when a selection (e.g. -m slow) has no test in that part
  local rc=0
  "$1" -m pytest "${@:2}" || rc=$?
  if (( rc != 0 && rc != 5 )); then status=1; fi
}
ruff check . || status=1
if (( ${#core[@]} )); then pytest_in python "${core[@]}" "${opts[@]}"; fi
if ! wait "$build"; then
  cat "$build_log" >&2
  exit 1
fi
rm -f "$build_log"
source scripts/_interop_env.sh  # built: this only sets JAXSAE_INTEROP_PYTHON
if (( ${#torch[@]} )); then pytest_in "$JAXSAE_INTEROP_PYTHON" "${torch[@]}" "${opts[@]}"; fi
exit "$status"
