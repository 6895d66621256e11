# iotad: the two front-door commands are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
IOTAD := $(VENV)/bin/iotad
# The CPU build of torch; a bare `pip install torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
DURATION ?= 60

.PHONY: setup servers demo test lint typecheck unit integration bench dashboards clean

setup: $(VENV)/.installed servers

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Debian's InfluxDB 1.x, Prometheus and Alertmanager for the local stack (root only; nothing is started).
servers:
	@if ! command -v influxd >/dev/null || ! command -v promtool >/dev/null || ! command -v amtool >/dev/null \
	    || ! command -v openssl >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      influxdb prometheus prometheus-alertmanager openssl >/dev/null; \
	  else echo "influxd missing: run 'sudo make servers' or install Debian's influxdb" >&2; exit 1; fi; \
	fi

demo: setup
	$(IOTAD) demo --duration $(DURATION)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy

unit: $(VENV)/.installed
	$(VENV)/bin/pytest -q tests/unit

integration: setup
	$(VENV)/bin/pytest -q tests/integration

test: setup lint typecheck
	$(PY) -m deploy.secret_scan
	$(VENV)/bin/pytest -q -ra

# Regenerate the committed dashboards and the PrometheusRule from their sources.
dashboards: $(VENV)/.installed
	$(PY) dashboards/generate.py
	$(PY) deploy/render_prometheusrule.py

bench: setup
	$(IOTAD) bench throughput --json

clean:
	rm -rf .iotad out .mypy_cache .ruff_cache .pytest_cache
