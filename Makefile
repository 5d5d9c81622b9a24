SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stamp

LINT_PATHS := src tests bench

.PHONY: help venv deps lint test up bench bench-nbd bench-resync bench-layers clean

help:
	@echo "Targets:"
	@echo "  make venv   create $(VENV) and install lamina with dev extras"
	@echo "  make deps   install missing system packages (qemu-utils, fio, nbdkit, ...)"
	@echo "  make lint   ruff check, ruff format --check, mypy"
	@echo "  make test   deps + venv + lint + pytest"
	@echo "  make up     start the local cluster, create volume demo, export it over NBD and use it"
	@echo "  make bench  run the storage benchmark"
	@echo "  make bench-nbd  run lamina nbd against nbdkit and qemu-nbd with fio (about 25 min)"
	@echo "  make bench-resync  measure resync after a storage server outage and its cost to fio (about 3 min)"
	@echo "  make bench-layers  4 KiB random reads of a volume under 20 snapshots against one with none (about 4 min)"
	@echo "  make clean  remove the venv, build artifacts and caches"

venv: $(STAMP)

# Re-runs only when pyproject.toml is newer than the stamp (or the venv is gone).
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null || { \
		if command -v $(PYTHON) >/dev/null 2>&1; then found="$$($(PYTHON) --version 2>&1 || true)"; else found="not found"; fi; \
		echo "error: Python >= 3.11 is required; '$(PYTHON)' is: $${found:-unknown version}." >&2; \
		echo "       Install a newer python3 or run: make PYTHON=/path/to/python3.11 venv" >&2; \
		exit 1; }
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || bash scripts/install-deps.sh python3-venv
	@if ! $(BIN)/python -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then \
		echo "creating $(VENV) with $$($(PYTHON) --version)"; \
		rm -rf $(VENV); \
		$(PYTHON) -m venv $(VENV); \
	fi
	$(BIN)/python -m pip install --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

deps:
	@bash scripts/install-deps.sh

lint: venv
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

test: deps venv lint
	$(BIN)/pytest -q

up: deps venv
	$(BIN)/lamina up
	$(BIN)/lamina volume info demo >/dev/null 2>&1 || $(BIN)/lamina volume create demo --size 1G --replicas 2 --stripe 3
	$(BIN)/lamina status
	BIN=$(BIN) bash scripts/demo-volume.sh

bench: venv
	$(BIN)/python bench/storage.py

bench-nbd: deps venv
	$(BIN)/python bench/nbd.py

bench-resync: deps venv
	$(BIN)/python bench/resync.py

bench-layers: deps venv
	$(BIN)/python bench/layers.py

clean:
	rm -rf $(VENV) build dist .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -path ./.git -prune -o -name '*.egg-info' -prune -exec rm -rf {} +
	find . -path ./.git -prune -o -name '__pycache__' -prune -exec rm -rf {} +
