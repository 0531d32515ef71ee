#!/usr/bin/env bash
# Install posemesh's server side into PYTHON's environment, the one way every environment is built:
# deploy/Dockerfile (production image; tests/test_image.py builds and checks it) and `make venv` (--dev).
#
#   deploy/install-server.sh PYTHON [WHEELS]       WHEELS: a folder holding the client wheel (posemesh-*.whl)
#                                                  and the server wheel (posemesh_server-*.whl), as `make wheel`
#                                                  writes them to dist/; default: both built from this checkout
#   deploy/install-server.sh PYTHON --dev          both distributions editable, with the dev extra (tests, bench)
#   deploy/install-server.sh PYTHON --dependencies what the two distributions depend on, and nothing of posemesh
#                                                  (read from ./pyproject.toml and ./clients/python/pyproject.toml):
#                                                  the Dockerfile's cached layer, before posemesh's code is copied
#
# pip cannot drop one dependency of a dependency, so trackers and supervision (which declare the GUI
# opencv-python) are installed --no-deps after the extra, which brings headless OpenCV and what they import.
set -euo pipefail
PY=$1
SOURCE=${2:-.}
HERE=$(cd "$(dirname "$0")" && pwd)
PIP=("$PY" -m pip install --disable-pip-version-check --no-cache-dir -q)

if [ "$SOURCE" = --dev ]; then
    # An older environment may hold the GUI builds; removing them after the headless one is installed
    # would delete files of the shared cv2/ folder, so they go first.
    "$PY" -m pip uninstall -q -y opencv-python opencv-contrib-python >/dev/null 2>&1 || true
    # The client first: the server distribution depends on it and installs into its `posemesh` package.
    # compat mode: the client folder goes on sys.path, so `posemesh` is its regular package (the server
    # distribution's editable finder would otherwise make `posemesh` a namespace without the client in it).
    "${PIP[@]}" -e clients/python --config-settings editable_mode=compat
    "${PIP[@]}" -e ".[dev]"
    # rtmlib (tests only) declares both GUI builds too; it runs on the headless one.
    "${PIP[@]}" --no-deps -r "$HERE/requirements-nodeps.txt" rtmlib==0.0.16
    if ! "$PY" -c "import cv2" 2>/dev/null; then  # cv2/ damaged by an earlier mixed install
        "${PIP[@]}" --force-reinstall --no-deps opencv-python-headless==5.0.0.93
    fi
elif [ "$SOURCE" = --dependencies ]; then
    LIST=$(mktemp)
    "$PY" -c "
import tomllib
for path in ('pyproject.toml', 'clients/python/pyproject.toml'):
    for requirement in tomllib.load(open(path, 'rb'))['project']['dependencies']:
        if not requirement.startswith('posemesh'):
            print(requirement)" > "$LIST"
    "${PIP[@]}" -r "$LIST"
    "${PIP[@]}" --no-deps -r "$HERE/requirements-nodeps.txt"
    rm -f "$LIST"
    exit 0  # nothing of posemesh to check yet: the full install after it does
else
    if [ -d "$SOURCE" ] && ls "$SOURCE"/posemesh_server-*.whl >/dev/null 2>&1; then
        WHEELS=$(realpath "$SOURCE")
        "${PIP[@]}" "$WHEELS"/posemesh-[0-9]*.whl "$WHEELS"/posemesh_server-*.whl
    else
        "${PIP[@]}" "$SOURCE/clients/python" "$SOURCE"
    fi
    "${PIP[@]}" --no-deps -r "$HERE/requirements-nodeps.txt"
fi

for gui in opencv-python opencv-contrib-python; do
    if "$PY" -m pip show -q "$gui" >/dev/null 2>&1; then
        echo "install-server.sh: $gui got installed; only opencv-python-headless may be" >&2
        exit 1
    fi
done
"$PY" -c "import cv2, trackers, supervision" || { echo "install-server.sh: server imports fail" >&2; exit 1; }
