#!/usr/bin/env bash
# Coordinator: allow a hospital's SuperNode to connect, by registering its public key.
#   deploy/register-hospital.sh hospital-a /path/to/hospital-a.pub
# Before you run it, compare the printed fingerprint with the one the hospital reads to you
# (genseg-fed certs show hospital-a.pub): the key file may have been swapped on its way.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh" coordinator.env
if [ $# -ne 2 ]; then
    echo "usage: $0 HOSPITAL-NAME PUBLIC-KEY-FILE" >&2
    exit 2
fi
name="$1"
pub="$2"
"$GENSEG_FED" certs show "$pub"
"$FLWR" supernode register "$pub" "${CONNECTION:-genseg}" --name "$name"
"$FLWR" supernode ls "${CONNECTION:-genseg}"
