#!/usr/bin/env bash
# Hospital: start this hospital's SuperNode, pointed at its own data folder (settings: hospital.env).
#   deploy/supernode.sh              # normal use
#   deploy/supernode.sh --dry-run    # check the CA file, key and data folder, print the command
#   deploy/supernode.sh --plain      # the unmodified flower-supernode (slower: one process per message)
#   deploy/supernode.sh --insecure   # NO TLS: only against a SuperLink started with --insecure (debugging)
# Other arguments are passed to `genseg-fed supernode` (see genseg-fed supernode --help).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh" hospital.env
args=(--superlink "$SUPERLINK" --site-name "$SITE_NAME" --data "$DATA_DIR" --state-dir "$STATE_DIR"
      --flwr-home "$FLWR_HOME" --port "${RUNTIME_PORT:-9094}")
security=(--ca "$CA_CERT" --key "$NODE_KEY")
for arg in "$@"; do
    if [ "$arg" = "--insecure" ]; then
        echo "WARNING: connecting WITHOUT TLS: weights and metrics travel in clear text. Debugging only." >&2
        security=(--insecure --no-auth)
    else
        args+=("$arg")
    fi
done
exec "$GENSEG_FED" supernode "${args[@]}" "${security[@]}"
