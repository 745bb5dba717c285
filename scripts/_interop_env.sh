# Sourced by scripts/test.sh: builds (once, cached) .venv-interop, the PyTorch environment:
# jaxsae with the extras `lm` (torch, transformers, gguf), `wandb` and `tensorboard`, plus
# SAELens, EleutherAI sparsify, tensorboard (whose reader the tracker tests use) and selenium
# (which drives Chromium for tests/interop/test_pages.py), pinned by
# scripts/interop-constraints.txt and scripts/constraints.txt. tests/interop/ run SAELens there
# in a subprocess; tests/lm/ (jaxsae cache, CE loss recovered) run there in full.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv-interop"
stamp="$venv/.jaxsae-interop"
want="$(cat "$root/pyproject.toml" "$root/scripts/constraints.txt" \
          "$root/scripts/interop-constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "building .venv-interop (jaxsae[lm] + torch 2.13.0 + sae-lens; once)" >&2
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  log="$venv/install.log"
  if ! { "$venv/bin/python" -m pip install --upgrade pip &&
         "$venv/bin/python" -m pip install -c "$root/scripts/interop-constraints.txt" \
           -c "$root/scripts/constraints.txt" -e "$root[lm,test,wandb,tensorboard]" sae-lens \
           eai-sparsify tensorboard selenium; } > "$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" | tail -30 >&2
    echo "building .venv-interop failed; full log: $log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
export JAXSAE_INTEROP_PYTHON="$venv/bin/python"
