# Set-up and entry points. Every install step of the project lives here: CI and a fresh machine
# run exactly these targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements/cpu.lock.txt
STAMP := $(VENV)/.installed
DEMO_DIR ?= data/demo
TINY_DIR ?= data/tiny
PYTEST_ARGS ?=

.PHONY: venv demo test clean-demo

venv: $(STAMP)

# The lock is installed with --no-deps: torchrec's metadata asks for the CUDA fbgemm-gpu, which
# must not land beside fbgemm-gpu-cpu (README, Set-up).
$(STAMP): $(LOCK) pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r $(LOCK)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# The main job: synthetic RecFlow twin -> Parquet day shards -> validate -> train LCRON and BCE on
# small-2stage -> a table of both results. It also writes every dataset the configs name (the 3-stage
# conversion of the same twin, and the tiny twin of configs/tiny-*.toml), so each README command runs.
demo: venv
	$(VENV)/bin/lcron-data synth --preset small --out $(DEMO_DIR)/raw
	$(VENV)/bin/lcron-data convert --src $(DEMO_DIR)/raw --out $(DEMO_DIR)/dataset-2stage --stages 2 --workers 2
	$(VENV)/bin/lcron-data convert --src $(DEMO_DIR)/raw --out $(DEMO_DIR)/dataset-3stage --stages 3 --workers 2
	$(VENV)/bin/lcron-data synth --preset tiny --out $(TINY_DIR)/raw
	$(VENV)/bin/lcron-data convert --src $(TINY_DIR)/raw --out $(TINY_DIR)/dataset-2stage --stages 2
	$(VENV)/bin/lcron-data convert --src $(TINY_DIR)/raw --out $(TINY_DIR)/dataset-3stage --stages 3
	$(VENV)/bin/lcron-data --quiet validate $(DEMO_DIR)/dataset-2stage
	$(VENV)/bin/lcron-data summary $(DEMO_DIR)/dataset-2stage
	rm -rf runs/demo
	$(PY) tools/compare_methods.py --config configs/small-2stage.toml --methods lcron,bce --seeds 0 \
		--out runs/demo --data.path=$(DEMO_DIR)/dataset-2stage

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

clean-demo:
	rm -rf $(DEMO_DIR) $(TINY_DIR)
