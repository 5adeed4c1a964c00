# The README's two commands: `make test` and `make book`. Each target creates .venv and installs
# what it needs on first use, so a fresh machine with only Python needs no other set-up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# ORACLE=1 also installs torch (the CPU build, 2.13.0, first, so no CUDA build is pulled) and
# transformers, which turns on the differential tests against them.
ORACLE ?= 0
HYPOTHESIS_PROFILE ?= dev
export HYPOTHESIS_PROFILE

.PHONY: test book lint bench oracle clean help
help:
	@echo "make test [ORACLE=1]   run the test suite (ORACLE=1: with torch/transformers oracles)"
	@echo "make book              build the executed Jupyter Book into book/_build/html"
	@echo "make lint              ruff"
	@echo "make bench [ORACLE=1]  run the benchmarks, write benchmarks/results.json"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

$(VENV)/.book-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test,book]'
	@touch $@

$(VENV)/.oracle-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,oracle]'
	@touch $@

ifeq ($(ORACLE),1)
ORACLE_DEP := $(VENV)/.oracle-installed
endif

test: $(VENV)/.test-installed $(ORACLE_DEP)
	$(BIN)/python -m pytest -q

lint: $(VENV)/.test-installed
	$(BIN)/ruff check refimpl tests benchmarks notebooks

book: $(VENV)/.book-installed
	$(BIN)/jupyter-book build --warningiserror --nitpick --keep-going book/

bench: $(VENV)/.test-installed $(ORACLE_DEP)
	$(BIN)/python -m benchmarks.run

oracle: $(VENV)/.oracle-installed

clean:
	rm -rf book/_build .pytest_cache .hypothesis
