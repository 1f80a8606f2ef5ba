# flowbus: `make demo` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-valkey lint bench soak chaos instructions clean

# flowbus needs Python 3.11 or later (pip on an older one back-tracks for minutes, then fails).
NEW_ENOUGH := import sys; sys.exit(sys.version_info < (3, 11))

# Two stamps: the demo needs flowbus alone; the tests, lint and benchmarks its test extras too
# (pytest, mypy, and Pipecat, about half a gigabyte, for the bridge's tests).
RUN_STAMP := $(VENV)/.installed-run

define make_venv
	@test -x $(BIN)/python || $(PYTHON) -c '$(NEW_ENOUGH)' 2>/dev/null || { \
	  echo "flowbus needs Python 3.11 or later ($(PYTHON) -V: $$($(PYTHON) -V 2>&1))." \
	    "Name another: make $(or $(MAKECMDGOALS),demo) PYTHON=python3.12" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c '$(NEW_ENOUGH)' || { \
	  echo "flowbus needs Python 3.11 or later, and $(VENV) has $$($(BIN)/python -V 2>&1):" \
	    "make clean, then make $(or $(MAKECMDGOALS),demo) PYTHON=python3.12" >&2; exit 1; }
endef

$(STAMP): pyproject.toml
	$(make_venv)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# (a venv installed for the tests has all the demo needs)
$(RUN_STAMP): pyproject.toml
	$(make_venv)
	test $(STAMP) -nt pyproject.toml || $(BIN)/python -m pip install --quiet -e .
	touch $(RUN_STAMP)

## Run the demo on the embedded server (no Redis needed).
demo: $(RUN_STAMP)
	$(BIN)/flowbus demo

## The whole test suite, against redis-server if on the PATH, else the embedded Valkey.
test: $(STAMP)
	$(BIN)/python -m pytest

## The whole test suite against the embedded Valkey 9.1.
test-valkey: $(STAMP)
	FLOWBUS_TEST_SERVER=valkey $(BIN)/python -m pytest

## Lint and type-check.
lint: $(STAMP)
	$(BIN)/ruff check bus flows workers tests bench
	$(BIN)/ruff format --check bus flows workers tests bench
	$(BIN)/mypy

## Benchmarks (not part of the tests).
bench: $(STAMP)
	$(BIN)/python -m bench
	$(BIN)/python -m bench.first_words

## Memory over five minutes of rolling calls (not part of `make bench`).
soak: $(STAMP)
	$(BIN)/python -m bench --only soak --output bench/soak.json

## Two minutes of calls on the bus, then two minutes of the demo's calls through its flow,
## while workers and the server are killed, stopped, frozen, added (not part of `make bench`;
## `python -m bench.chaos --help` and `python -m bench.flows_chaos --help` for longer runs).
chaos: $(STAMP)
	$(BIN)/python -m bench.chaos
	$(BIN)/python -m bench.flows_chaos

## Instructions per event of the consumers, counted by valgrind (not part of `make bench`).
instructions: $(STAMP)
	$(BIN)/python -m bench.instructions

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
