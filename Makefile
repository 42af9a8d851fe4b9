# Two entry points: `make bench` (the benchmark suite on the embedded default model) and
# `make test` (the whole test suite). Both create or reuse .venv and install torch==2.13.0
# (the CPU wheel here) before the package, so a fresh machine needs nothing else.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup bench test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,ray]"
	touch $@

bench: setup
	$(VENV)/bin/gpt2-engine bench $(ARGS)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests benchmarks --benchmark-disable $(ARGS)
