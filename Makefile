# posemesh: `make run` processes a clip end to end on a local stack; `make test` runs the test suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
TRITON_VENV := .venv-triton
PY := $(VENV)/bin/python
VIDEO ?= ../shared/media/mmpose_demo_960x540_5f.mp4

.PHONY: venv run up test bench lint protos configs clean

venv: $(VENV)/.installed $(TRITON_VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
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

test: venv
	$(PY) -m pytest -q tests

bench: venv
	$(PY) bench/end_to_end.py

protos: venv
	$(PY) -m posemesh.codegen

configs: venv
	$(PY) -m posemesh.models configs

lint: venv
	$(VENV)/bin/buf lint

clean:
	rm -rf run
