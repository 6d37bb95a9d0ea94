# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing and installs into it, torch first: TORCH_SPEC pins the torch release
# CI tests with. Which build pip takes depends on the index: CI's serves the CPU one, PyPI's Linux
# wheel is the CUDA 13 build. For the CPU build elsewhere: TORCH_SPEC=torch==2.13.0+cpu with
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Test processes for `make test`. Most tests wait on worker processes of their own, so one pytest
# process keeps about one of two cores busy; worksteal keeps the long tests from ending in a tail.
TEST_PROCESSES ?= 2

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/imgjobs demo --dir demo-out

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -n $(TEST_PROCESSES) --dist worksteal $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo-out .mypy_cache .ruff_cache .pytest_cache
