#!/usr/bin/env bash
# Trains the quickstart SAE on synthetic data with known features, then checks what it learned.
# Arguments are overrides of the config (e.g. name=wider sae.d_sae=2048): the evaluation is the
# command training prints for the SAE it trained.
set -euo pipefail
source "$(dirname "$0")/_venv.sh" ""  # explicit: sourcing would pass on our own arguments
log=$(mktemp)
trap 'rm -f "$log"' EXIT
jaxsae train configs/quickstart.yaml "$@" | tee "$log"
hint=$(sed -n 's/^evaluate it with: //p' "$log")
echo
echo "recovery of the 512 true features (mcc, mmcs) and reconstruction on the held-out tokens:"
eval "$hint"  # (jaxsae quotes its paths for the shell)
