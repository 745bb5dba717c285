#!/usr/bin/env bash
# Trains the quickstart SAE on synthetic data with known features, then checks what it learned.
set -euo pipefail
source "$(dirname "$0")/_venv.sh" ""  # explicit: sourcing would pass on our own arguments
jaxsae train configs/quickstart.yaml "$@"
echo
echo "recovery of the 512 true features (mcc, mmcs) and reconstruction on the held-out tokens:"
jaxsae eval runs/quickstart/sae --data data/quickstart --truth data/quickstart --tokens 65536
