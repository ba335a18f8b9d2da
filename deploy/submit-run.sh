#!/usr/bin/env bash
# Coordinator: submit a federated run and wait for its final status (settings: coordinator.env).
#   deploy/submit-run.sh --config deploy/demo.yaml --out-dir /var/lib/genseg-fed/runs/demo
#   deploy/submit-run.sh --config deploy/experiment.yaml --set federation.rounds=20 --out-dir ...
#   deploy/submit-run.sh --config deploy/experiment.yaml --out-dir ... --resume   # after a crash
# Exit status: 0 finished:completed, 1 failed or stopped, 3 not finished within --timeout.
# (`flwr run` alone exits 0 even when the run fails; this script asks the SuperLink.)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh" coordinator.env
cd "$(dirname "${BASH_SOURCE[0]}")/.."  # the app folder: relative --config paths are taken from here
exec "$GENSEG_FED" submit --connection "${CONNECTION:-genseg}" --flwr-home "$FLWR_HOME" --wait "$@"
