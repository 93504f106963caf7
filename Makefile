# Two commands: `make test` and `make demo`. Each creates .venv (or refreshes it when
# pyproject.toml/setup.py changed) and installs the project with its test extra.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python
# Tests that need a multi-device mesh set XLA_FLAGS themselves, in a subprocess or conftest.
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: test demo venv clean bench

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) tests

demo: $(STAMP)
	$(VENV)/bin/cpm2 demo

clean:
	rm -rf $(VENV) build *.egg-info
