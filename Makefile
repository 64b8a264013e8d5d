# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint typecheck test-nojit bench bench-ssd install clean

# The kernels' logic run as plain Python (NUMBA_DISABLE_JIT=1: nothing compiles, the
# intrinsics and libc calls use their Python stand-ins), so coverage and a debugger see it.
# About 80 s on 2 cores (the scan-resistance runs alone take 90 s more: left to the JIT);
# test_warmup counts compiled kernels, it needs the JIT. Numba wraps integer overflow
# silently (the checksums rely on it), numpy scalars warn: those warnings are dropped.
NOJIT_TESTS := tests/test_sls_kernel.py tests/test_cache_resolve.py tests/test_policies.py \
	tests/test_tiers.py tests/test_cache.py tests/test_store.py \
	-k 'not test_tinylfu_resists_scans' \
	-W 'ignore:overflow encountered:RuntimeWarning'

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { \
	  echo "tiermem needs Python 3.11 ($(PYTHON) is $$($(PYTHON) -V 2>&1)): make PYTHON=python3.11 ..." >&2; \
	  exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,service,ray]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tiermem demo

lint: $(STAMP)
	$(VENV)/bin/ruff check tiermem runtime traces tests bench

# the files and strictness are pyproject.toml's [tool.mypy]
typecheck: $(STAMP)
	$(VENV)/bin/mypy

test-nojit: $(STAMP)
	NUMBA_DISABLE_JIT=1 $(PY) -m pytest -q -p no:cacheprovider $(NOJIT_TESTS)

# In order, each one failing the target: lint, types, the JIT-off run, the suite.
# pytest exits 5 when it collects nothing: make then fails, as it should.
test: $(STAMP)
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory typecheck
	$(MAKE) --no-print-directory test-nojit
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

$(VENV)/.bench: $(STAMP)
	$(PY) -m pip install -q -e '.[test,service,ray,bench]'
	touch $(VENV)/.bench

bench: $(VENV)/.bench
	$(PY) bench/bench_sls.py

bench-ssd: $(STAMP)
	$(PY) bench/bench_ssd.py

clean:
	rm -rf $(VENV) demo-out bench-out
