# Two commands matter: `make demo` and `make test`. Both create .venv when it is missing.
#
# Torch: on a machine without a GPU we install the CPU build first (TORCH_SPEC), so that the
# package's own `torch>=2.4` range is already satisfied and pip never pulls a multi-GB CUDA
# build. On a GPU machine (nvidia-smi present) we keep whatever torch is there, or let pip
# choose the default CUDA build. Override with `make TORCH_SPEC=... TORCH_PIP_ARGS=...`.
PYTHON      ?= $(shell command -v python3.11 || command -v python3)
VENV        ?= .venv
BIN         := $(VENV)/bin
HAS_GPU     := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC  ?= $(if $(HAS_GPU),torch,torch==2.13.0)
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?= --durations=25

.PHONY: demo test install install-dev clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24" "setuptools>=69" wheel

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	touch $@

# invisible-watermark with --no-deps: see the comment in pyproject.toml.
WATERMARK_SPEC ?= invisible-watermark==0.2.0

$(VENV)/.installed: pyproject.toml setup.py $(VENV)/.torch
	$(BIN)/python -m pip install -e .
	$(BIN)/python -m pip install --no-deps "$(WATERMARK_SPEC)"
	touch $@

$(VENV)/.installed-dev: pyproject.toml setup.py $(VENV)/.torch
	$(BIN)/python -m pip install -e ".[dev]"
	$(BIN)/python -m pip install --no-deps "$(WATERMARK_SPEC)"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# Trains a small VAE and DiT on the generated shapes world (CPU, a few minutes), samples
# videos from captions and plots the loss curves. Everything lands in outputs/demo/.
demo: $(VENV)/.installed
	PATH=$(abspath $(BIN)):$$PATH bash launch/demo.sh

test: $(VENV)/.installed-dev
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest $(PYTEST_ARGS)

clean-demo:
	rm -rf outputs/demo data/shapes
