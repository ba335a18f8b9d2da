# Shared by the deploy/*.sh scripts: load the settings file, find genseg-fed and flwr.
# $1: default settings file name (coordinator.env or hospital.env); $GENSEG_ENV overrides it.
deploy_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
env_file="${GENSEG_ENV:-$deploy_dir/$1}"
if [ ! -f "$env_file" ]; then
    echo "error: settings file $env_file not found; copy $deploy_dir/$1.example to it and edit it" >&2
    exit 2
fi
set -a
# shellcheck disable=SC1090
source "$env_file"
set +a
GENSEG_FED="${GENSEG_FED:-genseg-fed}"
if ! command -v "$GENSEG_FED" >/dev/null 2>&1; then
    echo "error: $GENSEG_FED not found; set GENSEG_FED in $env_file to the genseg-fed of your venv" >&2
    exit 2
fi
FLWR="$(dirname "$(command -v "$GENSEG_FED")")/flwr"
