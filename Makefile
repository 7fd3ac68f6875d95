# Set-up and entry points. Every install step of the project lives here: CI and a fresh machine
# run exactly these targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements/cpu.lock.txt
STAMP := $(VENV)/.installed
DEMO_DIR ?= data/demo
PYTEST_ARGS ?=

.PHONY: venv demo test clean-demo

venv: $(STAMP)

# The lock is installed with --no-deps: torchrec's metadata asks for the CUDA fbgemm-gpu, which
# must not land beside fbgemm-gpu-cpu (docs: requirements/README.md).
$(STAMP): $(LOCK) pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r $(LOCK)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: venv
	$(VENV)/bin/lcron-data synth --preset small --out $(DEMO_DIR)/raw
	$(VENV)/bin/lcron-data convert --src $(DEMO_DIR)/raw --out $(DEMO_DIR)/dataset --stages 2 --workers 2
	$(VENV)/bin/lcron-data validate $(DEMO_DIR)/dataset
	$(VENV)/bin/lcron-data summary $(DEMO_DIR)/dataset

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

clean-demo:
	rm -rf $(DEMO_DIR)
