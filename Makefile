# The two set-up commands of the README: `make demo` and `make test`. Each creates (or reuses) the
# virtual environment in .venv and installs raycell with its pinned dependencies first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.raycell-installed

.PHONY: install demo test test-fast test-slow test-bench lint format bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/raycell demo

LINTED := raycell tests bench jobs docs

test: lint
	$(PY) -m pytest -q

# ruff's rules and line lengths are in pyproject.toml; `make format` applies the formatter
lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

format: $(STAMP)
	$(VENV)/bin/ruff format $(LINTED)
	$(VENV)/bin/ruff check --fix $(LINTED)

# every test that does not start Ray (~1 min); tests/conftest.py fails a test that starts Ray unmarked
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not ray and not bench"

# the long end-to-end and fault runs (marker `slow`, ~10 min on 2 cores): not run by `make test`,
# run by .ci/run
test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow and not bench"

# the benchmark scripts' own tests (bench/ on a CPU, the GPU benchmark included): not run by `make test`
test-bench: $(STAMP)
	$(PY) -m pytest -q -m bench

bench: $(STAMP)
	$(PY) bench/bench_dataloader.py

clean:
	rm -rf runs .pytest_cache
