# Sourced by the scripts: makes .venv (when missing) and installs jaxsae with the given extras,
# pinned by scripts/constraints.txt. Reinstalls only when pyproject.toml or the pins change.
# Usage: source scripts/_venv.sh EXTRAS   (e.g. "test", or "" for none; always pass it,
# since a bare `source` hands the caller's own arguments to this script)
set -euo pipefail
JAXSAE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$JAXSAE_ROOT"
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv" >&2
  python3 -m venv .venv
fi
stamp=".venv/.jaxsae-install-${extras:-base}"
want="$(cat pyproject.toml scripts/constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing jaxsae${extras:+[$extras]} into .venv (first run takes a few minutes)" >&2
  log=.venv/install.log
  if ! { .venv/bin/python -m pip install --upgrade pip &&
         .venv/bin/python -m pip install -c scripts/constraints.txt -e ".${extras:+[$extras]}"; \
       } > "$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" | tail -30 >&2
    echo "installation failed; full log: $log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
export PATH="$JAXSAE_ROOT/.venv/bin:$PATH"
