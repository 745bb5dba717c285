# Sourced by scripts/test.sh: builds (once, cached) .venv-interop with PyTorch and SAELens,
# pinned by scripts/interop-constraints.txt, for tests/interop/. jaxsae is not installed
# there: the tests run SAELens in a subprocess of that interpreter and compare results.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv-interop"
stamp="$venv/.jaxsae-interop"
want="$(sha256sum "$root/scripts/interop-constraints.txt" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "building .venv-interop (torch 2.13.0 + sae-lens, for tests/interop; once)" >&2
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  log="$venv/install.log"
  if ! { "$venv/bin/python" -m pip install --upgrade pip &&
         "$venv/bin/python" -m pip install -c "$root/scripts/interop-constraints.txt" \
           torch==2.13.0 sae-lens; } > "$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" | tail -30 >&2
    echo "building .venv-interop failed; full log: $log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
export JAXSAE_INTEROP_PYTHON="$venv/bin/python"
