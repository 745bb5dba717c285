#!/usr/bin/env bash
# The GPU check on a CUDA machine with JAX and PyTorch preinstalled (e.g. the device machine):
# installs the wheels carried in .whl/ (scripts/gpu_wheels.sh fetches them) into /tmp/site
# without an index, then runs benchmarks/gpu_check.py (arguments go to it), which writes
# gpu_check.json to $OUT (else ./gpu_check_out). The device tool's call:
#   run(command="scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "gpu_check.sh: no .whl/ (scripts/gpu_wheels.sh): SAELens is compared only if installed" >&2
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# Device memory is taken as needed (peak memory figures mean something, and SAELens's
# PyTorch, run beside JAX, finds room); output unbuffered, so a cut-off run still shows it.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu_check.py "$@"
