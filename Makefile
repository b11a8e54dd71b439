# Commands for people; CI runs `make test` and `make lint` through .ci/run.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
SRC := api workers models_db serving common cli migrations

.PHONY: setup test lint format up bench bench-train

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ needed"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 is pinned by the "train" extra (a CPU build where one is available).
	$(PY) -m pip install -q -e ".[train,dev]"
	touch $@

test: setup
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

bench: setup
	$(PY) bench/control_plane.py

# Our recipe vs LLaMA-Factory 0.9.5 (its own venv, built on first use) and HF Trainer: ~30 min.
bench-train: setup
	$(PY) bench/train_throughput.py
