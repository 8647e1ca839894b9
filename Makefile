# Two commands for a fresh Debian / Raspberry Pi OS machine: `make demo` and `make test`.
# Each installs what it needs: Debian packages when missing, the virtual environment in .venv, the Python packages.

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PKGS := python3-venv python3-pip

.PHONY: all demo test lint typecheck unit bench deps system-deps clean

all: test

system-deps:
	@if ! $(PY) -c 'import ensurepip, venv' >/dev/null 2>&1; then \
		echo "installing $(APT_PKGS)"; \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS); \
	fi

$(BIN)/python: | system-deps
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

deps: $(STAMP)

demo: deps
	$(BIN)/club-agent demo

lint: deps
	$(BIN)/ruff check agent tests benchmarks
	$(BIN)/ruff format --check agent tests benchmarks

typecheck: deps
	$(BIN)/mypy

unit: deps
	$(BIN)/pytest tests/unit -q

test: lint typecheck
	$(BIN)/pytest

bench: deps
	$(BIN)/python benchmarks/tap_latency.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build *.egg-info
