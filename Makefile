# Two commands for a new user: `make demo` and `make test`. Each bootstraps
# .venv from nothing but a Python >= 3.11 interpreter.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m bench.ablation

# 8 simulated CPU devices for the sharding tests (set in tests/conftest.py too).
test: $(STAMP)
	XLA_FLAGS="--xla_force_host_platform_device_count=8" $(PY) -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(PY) -m bench

lint: $(STAMP)
	$(PY) -m ruff check optimizers regularizers tests bench

clean:
	rm -rf $(VENV) .pytest_cache
