#!/usr/bin/env bash
# Make a local base image for deploy/Dockerfile where no registry can be reached:
#
#   deploy/base-image.sh [TAG]          default TAG: posemesh-base:bookworm
#   docker build -f deploy/Dockerfile --build-arg BASE=posemesh-base:bookworm -t posemesh .
#
# Debian bookworm, minbase, with what the Dockerfile's BASE must have (python3 >= 3.11 and its venv
# module, bash, useradd), from the Debian mirror this machine's apt already uses; imported with
# `docker import` (about a minute here). Nothing is done when TAG exists. Prints TAG. Needs root
# (debootstrap) and a running dockerd.
set -euo pipefail
TAG=${1:-posemesh-base:bookworm}
if docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "$TAG"
    exit 0
fi
MIRROR=${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ROOT=$(mktemp -d /var/tmp/posemesh-base.XXXXXX)
trap 'rm -rf "$ROOT"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOT" "$MIRROR" >&2
# apt's lists and caches are not part of an image
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/cache/apt/archives/*.deb
tar -C "$ROOT" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$TAG" >/dev/null
echo "$TAG"
