# Entry points: `make bench` (the benchmark suite on the embedded default model) and
# `make test` (the whole test suite). Both create or reuse .venv and install torch==2.13.0
# (the CPU wheel here) before the package, so a fresh machine needs nothing else.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
# The package is installed editable as a link tree (setuptools' strict mode): the repository's engine/
# and kernels/ appear as gpt2_engine/ and gpt2_engine/kernels/ (pyproject.toml). A new source file
# needs the tree relinked, so the link step depends on every file the package ships.
PACKAGE_FILES := $(shell find engine kernels -type f -not -name '*.pyc' 2>/dev/null)
STRICT := --config-settings editable_mode=strict

.PHONY: setup bench test gpu-check llama-cpp
setup: $(VENV)/.linked

$(VENV)/.installed: pyproject.toml setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,ray]" $(STRICT)
	touch $@

$(VENV)/.linked: $(VENV)/.installed $(PACKAGE_FILES)
	rm -rf build/__editable__.gpt2_engine-*
	$(PY) -m pip install -q --no-deps -e . $(STRICT)
	touch $@

bench: setup
	$(VENV)/bin/gpt2-engine bench $(ARGS)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests benchmarks --benchmark-disable $(ARGS)

# One-shot GPU check with the machine's own python3 and packages (no venv, no installs):
# `make gpu-check OUT=dir` writes dir/results.json and dir/results.md (benchmarks/gpu_check.py).
OUT ?= gpu-check-results
gpu-check:
	python3 -m benchmarks.gpu_check --out $(OUT)

# Optional benchmark peer (`gpt2-engine bench --systems ... llama.cpp`): llama-cpp-python built from
# source for this CPU (~30 minutes on 2 cores; not part of `make test`), and llama.cpp's GGUF converter
# from the same source, copied beside it into the environment (engine/bench/llama_cpp_peer.py).
LLAMA_CPP_PYTHON ?= 0.3.36
LLAMA_CPP_SRC := build/llama-cpp-python
llama-cpp: setup
	rm -rf $(LLAMA_CPP_SRC) && mkdir -p $(LLAMA_CPP_SRC)
	$(PY) -m pip download -q --no-deps --no-binary :all: -d $(LLAMA_CPP_SRC) llama-cpp-python==$(LLAMA_CPP_PYTHON)
	tar xzf $(LLAMA_CPP_SRC)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(LLAMA_CPP_SRC)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q $(LLAMA_CPP_SRC)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz gguf
	rm -rf $(VENV)/share/llama.cpp && mkdir -p $(VENV)/share/llama.cpp
	cd $(LLAMA_CPP_SRC)/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp && \
		cp -r convert_hf_to_gguf.py conversion gguf-py LICENSE $(abspath $(VENV))/share/llama.cpp/
