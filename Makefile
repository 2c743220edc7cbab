# Every target creates its own virtualenv, so a fresh clone needs nothing but python3 (>= 3.11) and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test lint type unit soak demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

type: $(STAMP)
	$(BIN)/mypy klaviyo_bridge

# pytest exits 5 when it collected nothing: that is a failure here, not a pass.
unit: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

test: lint type unit

# The fault suite's random-kill soak, long: SOAK_KILLS SIGKILLs of the real daemon (default 200, ~5 min).
SOAK_KILLS ?= 200
soak: $(STAMP)
	SOAK_KILLS=$(SOAK_KILLS) $(BIN)/pytest -q -p no:cacheprovider -s -o timeout=0 tests/faults/test_faults_soak.py

demo: $(STAMP)
	$(BIN)/klaviyo-bridge demo

# Benchmarks against the built-in simulators on loopback (~7 min on 2 cores; prints one table).
# Not part of `make test`. Adds the bench-only packages (official klaviyo-api SDK for the naive peer,
# psutil, py-spy) to the same virtualenv.
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) benchmarks/requirements.txt
	$(BIN)/pip install --quiet -r benchmarks/requirements.txt
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
