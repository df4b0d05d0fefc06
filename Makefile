# The one way in: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run lint format test docs docs-reference

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Without UPSTREAM_URL, run against the built-in demo upstream so a rewrite shows at once.
run: install
	$(BIN)/openai-model-rerouter $(if $(UPSTREAM_URL),,--demo)

lint: install
	$(BIN)/ruff check service tests
	$(BIN)/ruff format --check service tests

format: install
	$(BIN)/ruff check --fix service tests
	$(BIN)/ruff format service tests

test: lint
	@echo "make test: the whole suite starts real proxies and upstreams; about 8 minutes on 2 cores"
	$(BIN)/pytest -n 3

# The settings reference in docs/configuration.md, rewritten from service/options.py's OPTIONS
# (tests/test_config_docs.py fails while the committed page differs).
docs-reference: install
	$(BIN)/python -m service.config_docs

# The documentation site (mkdocs.yml) into site/; --strict: a broken link or anchor fails.
# tests/test_docs_site.py runs the same build, so `make test` does too.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# One file for a host with nothing but Python (the minor version and platform this builds with,
# for the compiled dependencies): python3 dist/openai-model-rerouter.pyz --help.
# build/ goes first: setuptools would package modules left there by an earlier build.
.PHONY: zipapp
zipapp: install
	rm -rf build
	mkdir -p dist
	$(BIN)/shiv -c openai-model-rerouter -o dist/openai-model-rerouter.pyz .

# Debian's prometheus package (promtool, and a server the tests start on a port of their own), for
# tests/test_prometheus.py; skipped when both are on PATH. Needs root or sudo; CI runs it first.
.PHONY: system-deps
system-deps:
	@if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then \
		echo "system-deps: promtool and prometheus are installed"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "system-deps: no apt-get here; install Prometheus (promtool, prometheus) yourself" >&2; exit 1; \
	else \
		if [ "$$(id -u)" = 0 ]; then sudo=; \
		elif command -v sudo >/dev/null 2>&1; then sudo=sudo; \
		else echo "system-deps: apt-get needs root or sudo" >&2; exit 1; fi; \
		set -x; \
		$$sudo apt-get update -qq && \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; \
	fi

# Debian's wrk (load generator) and nginx-light (canned upstream, reference reverse proxy) for
# `make bench`; a no-op when both are present. Needs root or sudo. Debian's nginx package may
# start a system nginx on port 80 where services can start; the benchmark never uses that one.
.PHONY: bench-deps
bench-deps:
	@if command -v wrk >/dev/null 2>&1 && { command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; }; then \
		echo "bench-deps: wrk and nginx are installed"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "bench-deps: no apt-get here; install wrk and nginx yourself" >&2; exit 1; \
	else \
		if [ "$$(id -u)" = 0 ]; then sudo=; \
		elif command -v sudo >/dev/null 2>&1; then sudo=sudo; \
		else echo "bench-deps: apt-get needs root or sudo" >&2; exit 1; fi; \
		set -x; \
		$$sudo apt-get update -qq && \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk nginx-light; \
	fi

# Loopback benchmark (bench/README.md): the proxy against the stack's floor, nginx and the
# upstream itself, its targets PASS/FAIL; JSON in bench/results/. Not part of `make test`.
# BENCH_ARGS=--quick for a one-minute smoke run.
.PHONY: bench
bench: install bench-deps
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# The same run with LiteLLM's proxy as a peer, installed (pinned) into a venv of its own,
# bench/.peers-venv (git-ignored). Slow: LiteLLM takes a minute to start, twice.
LITELLM_VERSION := $(shell sed -n 's/^LITELLM_VERSION = "\(.*\)".*/\1/p' bench/peers.py)
PEERS_VENV := bench/.peers-venv
.PHONY: bench-peers
bench-peers: install bench-deps $(PEERS_VENV)/.litellm-$(LITELLM_VERSION)
	$(BIN)/python -m bench.run --peers $(BENCH_ARGS)

$(PEERS_VENV)/.litellm-$(LITELLM_VERSION): bench/peers.py
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install -q 'litellm[proxy]==$(LITELLM_VERSION)'
	touch $@
