# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench bench-ssd install clean

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

# pytest exits 5 when it collects nothing: make then fails, as it should.
test: $(STAMP)
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
