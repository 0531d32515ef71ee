#!/usr/bin/env bash
# Build the posemesh image (deploy/Dockerfile) from this checkout, the one way the Makefile and the tests do:
#
#   deploy/build-image.sh [TAG]         default TAG: posemesh:latest (what deploy/compose.yaml runs)
#
# BASE: the base image, the official python:3.11-slim by default. When it cannot be pulled (no registry
#   reachable), a local Debian base is made with deploy/base-image.sh (debootstrap; needs root) and used.
# The Python packages are downloaded on this machine, with its own pip settings (mirrors, certificates,
# constraints), into build/wheelhouse, and served to the build by a loopback HTTP server (the build runs
# with --network host), so the build itself needs neither a package index nor a certificate store.
# PYTHON: the interpreter whose pip downloads them (python3).
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-posemesh:latest}
BASE=${BASE:-python:3.11-slim}
PY=${PYTHON:-python3}
WHEELHOUSE=build/wheelhouse

if ! docker image inspect "$BASE" >/dev/null 2>&1 && ! docker pull -q "$BASE" >/dev/null 2>&1; then
    echo "cannot pull $BASE: using a local Debian base (deploy/base-image.sh)" >&2
    BASE=$(deploy/base-image.sh)
fi

# Only what is missing is fetched; posemesh's own wheels are built inside the image from the checkout.
mkdir -p "$WHEELHOUSE"
"$PY" -m pip download -q --disable-pip-version-check -d "$WHEELHOUSE" "setuptools>=77" ./clients/python . 2>&1 \
    | grep -v "^WARNING: Location" >&2 || true
"$PY" -m pip download -q --disable-pip-version-check --no-deps -d "$WHEELHOUSE" -r deploy/requirements-nodeps.txt 2>&1 \
    | grep -v "^WARNING: Location" >&2 || true
rm -f "$WHEELHOUSE"/posemesh-* "$WHEELHOUSE"/posemesh_server-*
# The wheelhouse's URL is a build argument, so it is part of the layer cache's key: a fixed port keeps
# rebuilds cached, a free one is taken only when that port is busy.
PORT=$("$PY" -c "
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the last build's connections in TIME_WAIT: still free
try:
    s.bind(('127.0.0.1', ${WHEELHOUSE_PORT:-38451}))
except OSError:
    s.bind(('127.0.0.1', 0))
print(s.getsockname()[1])")
"$PY" -m http.server "$PORT" --bind 127.0.0.1 --directory "$WHEELHOUSE" >/dev/null 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 50); do
    "$PY" -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 0.2)" 2>/dev/null && break
    sleep 0.1
done

# BuildKit where the client has it (the buildx plugin), the classic builder otherwise.
if [ -z "${DOCKER_BUILDKIT:-}" ] && ! docker buildx version >/dev/null 2>&1; then
    export DOCKER_BUILDKIT=0
fi
docker build --network host -f deploy/Dockerfile --build-arg BASE="$BASE" \
    --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS="http://127.0.0.1:$PORT/" -t "$TAG" .
