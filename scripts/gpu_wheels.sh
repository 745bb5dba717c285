#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels the GPU check needs beyond what a CUDA machine
# with JAX and PyTorch preinstalled has (the device machine's image; Python 3.12, x86-64):
# SAELens and what importing its trainer pulls in, and tyro for jaxsae's command modules. The
# versions are the ones the test suite's interop environment pins
# (scripts/interop-constraints.txt). scripts/gpu_check.sh installs them from .whl/ with no
# index. Run here, where PyPI is reachable; carry .whl to the GPU machine.
#   scripts/gpu_wheels.sh [DIR]        (default .whl)
set -euo pipefail
case "${1:-}" in
  -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  -*) echo "gpu_wheels.sh: unknown option $1 (usage: scripts/gpu_wheels.sh [DIR])" >&2; exit 2 ;;
esac
if [ "$#" -gt 1 ]; then echo "gpu_wheels.sh: usage: scripts/gpu_wheels.sh [DIR]" >&2; exit 2; fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$root/.whl}"
constraints="$root/scripts/interop-constraints.txt"
names=(sae-lens transformer-lens wandb datasets dill multiprocess pydantic pydantic_core
       annotated-types typing-inspection better-abc docstring_parser simple-parsing tyro
       typeguard trio outcome sniffio truststore platformdirs PySocks httpx2 httpcore2
       googleapis-common-protos opentelemetry-api opentelemetry-sdk opentelemetry-proto
       opentelemetry-semantic-conventions opentelemetry-exporter-http-transport
       opentelemetry-exporter-otlp-common opentelemetry-exporter-otlp-proto-common
       opentelemetry-exporter-otlp-proto-http)
pins=()
for name in "${names[@]}"; do
  pin="$(grep -i -E "^${name//[-_]/[-_.]}==" "$constraints" | head -1)" || true
  if [ -z "$pin" ]; then
    echo "gpu_wheels.sh: $name is not pinned in $constraints" >&2
    exit 2
  fi
  pins+=("$pin")
done
mkdir -p "$dest"
platforms=()
for n in 39 35 34 31 28 27 24 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$dest" "${pins[@]}"
du -sh "$dest"
