# `make serve` serves the shipped model (serving dependencies only). `make test` is the contributor's command:
# it installs torch and the test tools, Debian packages when root, the datasets, and runs every test (README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: serve test install install-dev system-deps data lint format typecheck train export examples clean image image-cpu test-container bench screenshot dist check-wheel docs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# serving install only: no torch
$(VENV)/.serve-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# training/export + test tools; torch==2.13.0 comes from pip's index (PyPI alone: the CUDA build; for the CPU
# wheels set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu in the environment)
$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[train,dev]'
	touch $@ $(VENV)/.serve-installed

install: $(VENV)/.serve-installed
install-dev: $(VENV)/.dev-installed

serve: $(VENV)/.serve-installed
	$(BIN)/capsnet serve --host $(HOST) --port $(PORT)

# Debian packages the tests need (Fashion-MNIST data, buildah + debootstrap for the container test, podman + podman-compose for the compose test, wrk for the benchmark, chromium for the web page's browser test, tcmalloc for training);
# installed only when missing and when we may (root with apt-get).
system-deps:
	bash scripts/system-deps.sh

data: $(VENV)/.dev-installed system-deps
	$(BIN)/capsnet data mnist fashion-mnist

test: $(VENV)/.dev-installed data
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(VENV)/.dev-installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(VENV)/.dev-installed
	$(BIN)/mypy

# The shipped model: paper-size CapsNet on full MNIST. ~12 min per epoch on 2 CPU cores under tcmalloc
# (docs/training.md); resumable.
EPOCHS ?= 1
train: $(VENV)/.dev-installed data
	$(BIN)/capsnet train --dataset mnist --epochs $(EPOCHS) --output runs/mnist --resume

export: $(VENV)/.dev-installed
	$(BIN)/capsnet export runs/mnist/best.pt --output models/capsnet-mnist --name capsnet-mnist

examples: $(VENV)/.dev-installed
	$(BIN)/python examples/make_examples.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache dist build *.egg-info

# The sdist and the wheel in dist/ (the wheel carries the shipped model and the web page), checked by twine
dist: $(VENV)/.dev-installed
	rm -rf dist
	$(BIN)/python -m build
	$(BIN)/twine check --strict dist/*

# The wheel as users install it: a fresh virtualenv outside the checkout, `capsnet serve` from /tmp
# answering /predict, `capsnet predict examples/` (CI runs this after the tests)
check-wheel: $(VENV)/.dev-installed
	PYTHON=$(BIN)/python bash scripts/check-wheel.sh

# Container images (docker/Dockerfile), both on debian:bookworm-slim; the GPU one carries CUDA and cuDNN as
# pinned wheels. The container tests build both with buildah instead, and start compose's CPU service with
# podman-compose (tests/container)
image:
	docker build -f docker/Dockerfile -t capsnet-service:gpu .

image-cpu:
	docker build -f docker/Dockerfile --build-arg FLAVOUR=cpu -t capsnet-service:cpu .

test-container: $(VENV)/.dev-installed system-deps
	$(BIN)/python -m pytest -m container tests/container

# Side-by-side inference benchmark (needs wrk); writes bench/results/latest.json
bench: $(VENV)/.dev-installed system-deps
	$(BIN)/python -m bench --output bench/results/latest.json

# The README's picture of the web page, taken by its browser test (headless Chromium from system-deps)
screenshot: $(VENV)/.dev-installed system-deps
	CAPSNET_SCREENSHOT=docs/web-page.png $(BIN)/python -m pytest tests/service/test_web_page.py

# docs/performance.md from bench/results/*.json, then the test that README.md and docs/ match the code
docs: $(VENV)/.dev-installed
	$(BIN)/python -m bench.report
	$(BIN)/python -m pytest tests/test_docs.py
