# `make demo`, `make test` and `make docs` create (or refresh) a virtual environment in $(VENV) and use it.
# `make demo TORCH=cpu` (or test, docs) installs PyTorch's CPU-only build into a new environment first: about
# 0.2 GB instead of about 3 GB of CUDA wheels (see README.md).
PYTHON ?= python3
VENV ?= .venv
TORCH ?=
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.deps-$(shell sha256sum pyproject.toml | cut -c1-16)

.PHONY: setup demo test lint docs dist

$(STAMP): pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip "setuptools>=77,<81"  # 77: the SPDX licence (see pyproject.toml)
	$(if $(filter cpu,$(TORCH)),$(VENV)/bin/pip install -q torch torchvision --index-url $(TORCH_CPU_INDEX))
	$(VENV)/bin/pip install -q -e ".[dev,docs]"
	touch $@

setup: $(STAMP)
	@# An environment cached from another checkout must point at this one.
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .

demo: setup
	$(VENV)/bin/tta adapt --method tent --corruption digits

test: setup
	$(VENV)/bin/python -m pytest

lint: setup
	$(VENV)/bin/ruff check tta tests benchmarks docs/gen_tables.py

docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

dist: setup
	rm -rf dist
	$(VENV)/bin/python -m build
	$(VENV)/bin/twine check --strict dist/*
