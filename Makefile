# Every target creates its own virtualenv, so a fresh clone needs nothing but python3 (>= 3.11) and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# `make demo` needs the package and the simulators' spec validator only; test tools come with `make test`.
RUN_STAMP := $(VENV)/.installed-run

.PHONY: test lint type unit unit-tz promtool soak demo bench mutate clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet -e '.[sandbox]'
	touch $(RUN_STAMP)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP) $(RUN_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

type: $(STAMP)
	$(BIN)/mypy klaviyo_bridge tests/mutation/run.py

# promtool runs the alerting-rule tests (tests/test_contrib.py). One on PATH is used as it is; otherwise the
# binary is taken from Debian's prometheus package: `apt-get download` needs no root once apt's package lists
# exist (as root, a failed download runs `apt-get update` and tries again), and only promtool is unpacked,
# into .venv/tools/. About 3 s with a warm mirror. Anything else fails here, loudly: the test is never skipped.
PROMTOOL ?= $(or $(shell command -v promtool 2>/dev/null),$(VENV)/tools/promtool)

$(VENV)/tools/promtool:
	@set -eu; \
	fail() { echo "make: cannot provide promtool: $$1." >&2; \
	  echo "  Install Debian's prometheus package (apt-get install prometheus), or run 'apt-get update' as root" >&2; \
	  echo "  so that 'apt-get download prometheus' works, or pass PROMTOOL=/path/to/promtool." >&2; exit 1; }; \
	command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1 || fail "no apt-get/dpkg-deb here"; \
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	apt_opts=""; [ "$$(id -u)" -ne 0 ] || apt_opts="-o APT::Sandbox::User=root"; \
	echo "promtool not on PATH: downloading Debian's prometheus package for it"; \
	download() { (cd "$$tmp" && apt-get download -qq $$apt_opts prometheus) >"$$tmp/apt.log" 2>&1; }; \
	if ! download; then \
	  [ "$$(id -u)" -eq 0 ] || { cat "$$tmp/apt.log" >&2; fail "apt-get download prometheus failed (not root: no apt-get update)"; }; \
	  apt-get update -qq >"$$tmp/apt.log" 2>&1 || { cat "$$tmp/apt.log" >&2; fail "apt-get update failed"; }; \
	  download || { cat "$$tmp/apt.log" >&2; fail "apt-get download prometheus failed"; }; \
	fi; \
	dpkg-deb --fsys-tarfile "$$tmp"/prometheus_*.deb | tar -x -C "$$tmp" ./usr/bin/promtool; \
	mkdir -p $(@D) && install -m 0755 "$$tmp/usr/bin/promtool" $@; \
	$@ --version | head -n 1

promtool: $(PROMTOOL)
	@$(PROMTOOL) --version | head -n 1

# pytest exits 5 when it collected nothing: that is a failure here, not a pass.
PYTEST = PROMTOOL=$(abspath $(PROMTOOL)) $(BIN)/pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

unit: $(STAMP) $(PROMTOOL)
	$(PYTEST)

# The whole suite again with the machine's local time zone far from UTC (Tokyo, UTC+9): no time may depend
# on it. Without tzdata, TZ=Asia/Tokyo would silently mean UTC, so that is checked first.
TEST_TZ ?= Asia/Tokyo
unit-tz: $(STAMP) $(PROMTOOL)
	@TZ=$(TEST_TZ) $(BIN)/python -c 'import sys, time; sys.exit(time.timezone == 0 and "TZ=$(TEST_TZ) is UTC here: is tzdata installed?")'
	TZ=$(TEST_TZ) $(PYTEST)

test: lint type unit unit-tz

# The fault suite's random-kill soak, long: SOAK_KILLS SIGKILLs of the real daemon (default 200, ~5 min).
SOAK_KILLS ?= 200
soak: $(STAMP)
	SOAK_KILLS=$(SOAK_KILLS) $(BIN)/pytest -q -p no:cacheprovider -s -o timeout=0 tests/faults/test_faults_soak.py

demo: $(RUN_STAMP)
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

# Mutation testing (tests/mutation/run.py): each module mutated by mutmut and run against its own test file, killed
# and survived per module, listed equivalents (tests/mutation/equivalents.toml) left out of the score; fails below a
# module's floor. A subset: make mutate MODULES="core orders". Work files in mutants/ (rebuilt every run).
MODULES ?= core orders ratelimit slices config config_fields config_secrets config_problems config_env
MUTATE_STAMP := $(VENV)/.mutate-installed

$(MUTATE_STAMP): $(STAMP) tests/mutation/requirements.txt
	$(BIN)/pip install --quiet -r tests/mutation/requirements.txt
	touch $(MUTATE_STAMP)

mutate: $(MUTATE_STAMP)
	$(BIN)/python tests/mutation/run.py $(MODULES)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info mutants
