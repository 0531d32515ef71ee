#!/usr/bin/env bash
# Make the two secret files the gateway needs, where they are missing (an existing file is never touched):
#   api_keys.txt   one `user:key` line: a random API key for USER (default: admin); add a line per user
#   secrets.key    a new Fernet key sealing the camera URLs the gateway stores (keep a copy: what it sealed
#                  cannot be opened without it)
#
#   deploy/make-secrets.sh [DIR [USER]]     DIR: default deploy/, where deploy/compose.yaml reads them
#
# Compose bind-mounts them as they are (owner and mode too) and the gateway runs as uid 10001: run as root
# and they are made owned by 10001, mode 0400; otherwise they are made readable by all (a warning says so).
# Kubernetes: `kubectl create secret generic ... --from-file` reads the same files (deploy/README.md).
set -euo pipefail
DIR=${1:-$(cd "$(dirname "$0")" && pwd)}
KEY_USER=${2:-admin}
mkdir -p "$DIR"
umask 077
random() { python3 -c 'import base64, os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())'; }

made=()
if [ ! -e "$DIR/api_keys.txt" ]; then
    printf '# one user:key per line (no commas: they separate entries too)\n%s:%s\n' \
        "$KEY_USER" "$(random | tr -d '=')" > "$DIR/api_keys.txt"
    made+=("$DIR/api_keys.txt")
fi
if [ ! -e "$DIR/secrets.key" ]; then
    random > "$DIR/secrets.key"   # a Fernet key: 32 random bytes, url-safe base64
    made+=("$DIR/secrets.key")
fi
for f in "${made[@]}"; do
    if [ "$(id -u)" = 0 ]; then
        chown 10001:10001 "$f" && chmod 0400 "$f"
    else
        chmod 0644 "$f"
        echo "make-secrets.sh: $f is readable by every local user (the container's uid 10001 must read it);" \
             "as root: chown 10001:10001 $f && chmod 0400 $f" >&2
    fi
    echo "made $f"
done
[ ${#made[@]} -gt 0 ] || echo "both files exist in $DIR: nothing made"
