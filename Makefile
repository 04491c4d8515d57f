# `make test` and `make setup` create (or refresh) a virtual environment in $(VENV) and use it.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.deps-$(shell sha256sum pyproject.toml | cut -c1-16)

.PHONY: setup test lint

$(STAMP): pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

setup: $(STAMP)
	@# An environment cached from another checkout must point at this one.
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .

test: setup
	$(VENV)/bin/python -m pytest

lint: setup
	$(VENV)/bin/ruff check tta tests benchmarks
