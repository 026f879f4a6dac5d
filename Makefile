# corral: `make demo` runs a local two-node cluster; `make test` runs the whole suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test lint bench setup setup-test clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[embedded,monitor]'
	touch $@

# llama-cpp-python builds from source once (about 7 minutes on 2 cores); pip caches the wheel.
$(VENV)/.test: $(VENV)/.base
	$(PIP) install -e '.[test,llama]'
	touch $@

setup: $(VENV)/.base
setup-test: $(VENV)/.test

demo: setup
	@scripts/ensure-redis.sh || echo "continuing with the embedded broker"
	$(VENV)/bin/corral demo

lint: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: setup-test lint
	scripts/ensure-redis.sh
	$(PY) -m pytest

# `make bench QUICK=--quick` keeps the routing, fleet, streams, gateway, throughput and footprint
# benchmarks under a minute each.
QUICK ?=
bench: setup-test
	scripts/ensure-redis.sh
	$(PY) -m benchmarks.ttft
	$(PY) -m benchmarks.failover
	$(PY) -m benchmarks.job_footprint --quick
	$(PY) -m benchmarks.routing $(QUICK)
	$(PY) -m benchmarks.fleet $(QUICK)
	$(PY) -m benchmarks.streams $(QUICK)
	$(PY) -m benchmarks.gateway $(QUICK)
	# The soak's 3-minute version; `python -m benchmarks.soak` runs the 30-minute one.
	$(PY) -m benchmarks.soak --quick
	$(PY) -m benchmarks.throughput $(QUICK)
	$(PY) -m benchmarks.footprint $(QUICK)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
