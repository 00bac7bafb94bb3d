# Two commands for a new user: `make demo` and `make test`. Each bootstraps
# .venv from nothing but a Python >= 3.11 interpreter. `make test` runs, in order,
# lint (ruff + pyrefly), the docs build, then the test suite with the docstring examples,
# and stops with a non-zero exit at the first failure.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint doctest docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m bench.ablation

# 8 simulated CPU devices for the sharding tests (set in tests/conftest.py too). A persistent
# compilation cache, emptied first, lets identical programs compiled by different tests and
# workers (resumed runs, notebooks vs benchmarks) compile once per run. The docstring
# examples (`make doctest`) run in the same two-worker session as the tests. Scheduling
# (tests/conftest.py): one unit of work per test file, except the notebooks and benchmarks
# (one per test), longest units first.
JAX_CACHE := $(CURDIR)/.jax_cache
test: $(STAMP) lint docs
	rm -rf $(JAX_CACHE)
	XLA_FLAGS="--xla_force_host_platform_device_count=8" JAX_COMPILATION_CACHE_DIR=$(JAX_CACHE) \
	JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.2 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0 \
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25 \
	  --doctest-modules tests optimizers regularizers

bench: $(STAMP)
	$(PY) -m bench

# ruff, then the pyrefly type checker (configured in pyproject.toml: [tool.pyrefly]).
lint: $(STAMP)
	$(PY) -m ruff check optimizers regularizers tests bench docs
	$(VENV)/bin/pyrefly check --summary=none

# The `Examples:` of every docstring in both packages (doctest options in pyproject.toml).
doctest: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --doctest-modules optimizers regularizers

# API reference, notebooks (stored outputs, never executed), benchmark tables; warnings fail.
docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

clean:
	rm -rf $(VENV) .pytest_cache $(JAX_CACHE) docs/_build docs/_generated docs/api docs/notebooks
