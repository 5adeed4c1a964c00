# The README's two commands: `make test` and `make book`. Each target creates .venv and installs
# what it needs on first use, so a fresh machine with only Python needs no other set-up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# ORACLE=1 also installs torch (the CPU build, 2.13.0, first, so no CUDA build is pulled) and
# transformers, which turns on the differential tests against them.
ORACLE ?= 0
# MPI=1 also installs the 'mpi' extra (mpi4py + the mpich wheel, which ships mpiexec), which turns
# on the distributed tests in tests/parallel (they skip cleanly without it).
MPI ?= 0
HYPOTHESIS_PROFILE ?= dev
export HYPOTHESIS_PROFILE

.PHONY: test book browser-test lint bench oracle clean help
help:
	@echo "make test [ORACLE=1] [MPI=1]  run the test suite (ORACLE=1: torch/transformers oracles;"
	@echo "                       MPI=1: mpi4py + mpich, the expert/data-parallel tests under mpiexec)"
	@echo "make book              build the executed Jupyter Book into book/_build/html"
	@echo "make browser-test      open every page of the built book in headless Chromium, network blocked"
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

$(VENV)/.browser-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test,browser]'
	@touch $@

$(VENV)/.oracle-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,oracle]'
	@touch $@

ifeq ($(ORACLE),1)
ORACLE_DEP := $(VENV)/.oracle-installed
endif

$(VENV)/.mpi-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test,mpi]'
	@touch $@

ifeq ($(MPI),1)
MPI_DEP := $(VENV)/.mpi-installed
endif

test: $(VENV)/.test-installed $(ORACLE_DEP) $(MPI_DEP)
	$(BIN)/python -m pytest -q

lint: $(VENV)/.test-installed
	$(BIN)/ruff check refimpl tests benchmarks notebooks book/_ext book/warm_cache.py

# The long recipe runs go first, in parallel worker processes, into the cache the chapters read.
book: $(VENV)/.book-installed
	$(BIN)/python book/warm_cache.py
	$(BIN)/jupyter-book build --warningiserror --nitpick --keep-going book/

# Needs Debian's chromium (/usr/bin/chromium; .ci/run installs it with apt-get). Builds the book first
# only if there is no build; screenshots of every page go to book/_build/screenshots/.
browser-test: $(VENV)/.browser-installed
	@test -f book/_build/html/intro.html || $(MAKE) book
	REFIMPL_BROWSER_TEST=1 $(BIN)/python -m pytest -q tests/book

bench: $(VENV)/.test-installed $(ORACLE_DEP)
	$(BIN)/python -m benchmarks.run

oracle: $(VENV)/.oracle-installed

clean:
	rm -rf book/_build .pytest_cache .hypothesis notebooks/_cache
