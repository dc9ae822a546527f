# `make test` and `make demo` set up everything from a bare machine: they create (or reuse) .venv,
# install the project with its test extras, then run. The venv is rebuilt only when pyproject.toml changes.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.surgeon-installed
# torch/torchvision pinned to the builds that pip serves here (torch-fidelity needs torchvision).
TORCH  ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install test quality format demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# ruff (lint, import order, format) and mypy, configured in pyproject.toml; CI runs this before the tests
quality: $(STAMP)
	$(VENV)/bin/ruff check surgeon cli tests benchmarks examples setup.py
	$(VENV)/bin/ruff format --check surgeon cli tests benchmarks examples setup.py
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix surgeon cli tests benchmarks examples setup.py
	$(VENV)/bin/ruff format surgeon cli tests benchmarks examples setup.py

demo: $(STAMP)
	$(PY) -m surgeon.study.demo

bench: $(STAMP)
	$(PY) benchmarks/bench_storage.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
