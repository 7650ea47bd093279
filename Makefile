# The README's commands. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: demo test lint services bench clean

$(VENV)/.base: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "taskstream needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[numpy,plot]'
	@touch $@

$(VENV)/.dev: $(VENV)/.base pyproject.toml
	$(PIP) install -q -e '.[dev]'
	@touch $@

demo: $(VENV)/.base
	$(VENV)/bin/taskstream demo

services:
	bash scripts/services.sh

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/mypy

test: $(VENV)/.dev services lint
	$(PY) -m pytest -q

bench: $(VENV)/.dev services
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
