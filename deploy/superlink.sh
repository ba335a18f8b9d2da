#!/usr/bin/env bash
# Coordinator: start the SuperLink with TLS and SuperNode authentication (settings: coordinator.env).
#   deploy/superlink.sh              # normal use
#   deploy/superlink.sh --dry-run    # check certificates and settings, print the command, do not start
#   deploy/superlink.sh --insecure   # NO TLS, no authentication: loopback debugging only
# Other arguments are passed to `genseg-fed superlink` (see genseg-fed superlink --help).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh" coordinator.env
args=(--certs "$CERTS_DIR" --host "$SUPERLINK_HOST" --port "$SUPERLINK_PORT"
      --state-dir "$STATE_DIR" --flwr-home "$FLWR_HOME" --connection "${CONNECTION:-genseg}")
for arg in "$@"; do
    if [ "$arg" = "--insecure" ]; then
        echo "WARNING: starting the SuperLink WITHOUT TLS and WITHOUT SuperNode authentication." >&2
        echo "WARNING: anyone who reaches port $SUPERLINK_PORT can join or submit code. Loopback debugging only." >&2
        args+=(--insecure --no-supernode-auth)
    else
        args+=("$arg")
    fi
done
exec "$GENSEG_FED" superlink "${args[@]}"
