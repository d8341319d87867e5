# uap_lightning: `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install run demo imagenet lint format test test-slow test-all bench bench-smoke tensorboard clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,bench,sweep,imagenet,tracking]"
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the package (editable) with its dev, bench, sweep, imagenet and tracking extras

run: $(STAMP) ## Run the default experiment (digits, cnn, deepfool_uap); extra overrides: make run ARGS="attack.eps=64"
	$(BIN)/python -m uap_lightning.run $(ARGS)

demo: $(STAMP) ## The phenomenon on a real ImageNet classifier in about two minutes (UAP_DATA_DIR must hold imagenet-samples/)
	$(BIN)/python -m uap_lightning.run experiment=imagenet_demo $(ARGS)

imagenet: $(STAMP) ## The paper's headline: EfficientNet-Lite0 on the ImageNet photographs (UAP_DATA_DIR must hold imagenet-samples/)
	$(BIN)/python -m uap_lightning.run experiment=imagenet_lite0 $(ARGS)

lint: $(STAMP) ## ruff (lint and format check), mypy and import-linter: what CI runs first
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy
	$(BIN)/lint-imports

format: $(STAMP) ## Format the code and sort imports with ruff
	$(BIN)/ruff check --select I --fix src tests
	$(BIN)/ruff format src tests

test: $(STAMP) ## Run the test suite (offline, CPU; slow tests deselected; one worker per core)
	$(BIN)/python -m pytest -m "not slow" -n auto $(PYTEST_ARGS)

test-slow: $(STAMP) ## Run only the slow tests (use the CIFAR-10 copy when UAP_DATA_DIR points at it)
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-all: $(STAMP) ## Run every test, slow ones included
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP) ## Benchmark ART, the naive reference and the project's engines side by side
	$(BIN)/python -m uap_lightning.bench $(ARGS)

bench-smoke: $(STAMP) ## The benchmark on digits, in under a minute
	$(BIN)/python -m uap_lightning.bench experiment=bench_smoke $(ARGS)

TB_HOST ?= localhost
tensorboard: $(STAMP) ## Serve TensorBoard over outputs/ and multirun/ on localhost; TB_HOST=0.0.0.0 serves the network, ARGS="--port 6007"
	$(BIN)/tensorboard --logdir_spec outputs:outputs,multirun:multirun --host $(TB_HOST) $(ARGS)

clean: ## Remove run outputs and caches (keeps .venv)
	rm -rf outputs multirun .cache .pytest_cache .hypothesis
