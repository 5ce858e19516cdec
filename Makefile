# cellmesh: one Makefile for people and CI. Every target installs what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: all demo test check lint fmt bench sysdeps clean help install

help:
	@echo "make demo    start a local mesh on loopback, ping across it, show the results"
	@echo "make test    install everything (venv, system packages) and run the whole test suite"
	@echo "make lint    ruff + mypy --strict + import layering"
	@echo "make check   lint + test"
	@echo "make bench   run every benchmark in bench/ and print figures with baseline ratios"

# System packages: a Python with venv/ensurepip (needed by everything), iproute2 (ip netns) for the
# namespace tests and nftables for the NAT (masquerade) namespace test. As root, missing ones are
# installed with apt-get. Without root, a missing Python venv stops here; missing ip/nft only
# warn: `make demo` needs neither, and the namespace tests fail saying what is missing.
sysdeps:
	@need=""; want=""; \
	$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || need="$$need python3-venv python3-pip"; \
	command -v ip >/dev/null 2>&1 || want="$$want iproute2"; \
	command -v nft >/dev/null 2>&1 || want="$$want nftables"; \
	missing="$$need$$want"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing system packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  elif [ -n "$$need" ]; then \
	    echo "missing system packages:$$need (install them, e.g. sudo apt-get install$$need)"; exit 1; \
	  else \
	    echo "note: missing$$want (sudo apt-get install$$want): the namespace tests will fail without them; everything else works"; \
	  fi; \
	fi

$(STAMP): pyproject.toml | sysdeps
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cellmesh demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy
	$(BIN)/lint-imports

fmt: $(STAMP)
	$(BIN)/ruff format src tests bench examples
	$(BIN)/ruff check --fix src tests bench examples

check: lint test

bench: $(STAMP)
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build src/*.egg-info
