#!/usr/bin/env bash
# Coordinator: a run's status as the SuperLink knows it (settings: coordinator.env).
#   deploy/run-status.sh RUN-ID            # e.g. "run 123: finished:completed after 95 s"
#   deploy/run-status.sh RUN-ID --json     # Flower's whole record (flwr ls --format json)
#   deploy/run-status.sh RUN-ID --wait     # block until it ends
#   deploy/run-status.sh --all             # every run (flwr ls)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh" coordinator.env
if [ "${1:-}" = "--all" ]; then
    exec "$FLWR" ls "${CONNECTION:-genseg}"
fi
exec "$GENSEG_FED" status --connection "${CONNECTION:-genseg}" --flwr-home "$FLWR_HOME" "$@"
