# The two commands: `make demo` (the whole pipeline on synthetic data) and `make test` (the suite).
# Both create .venv on first use; nothing needs installing by hand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The exact versions the suite is tested with; pyproject.toml only gives ranges.
CONSTRAINTS := constraints.txt

.PHONY: demo test test-fast venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing ddpdiff and its dependencies into $(VENV) (first run takes a minute or two)..."
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile -c $(CONSTRAINTS) -e '.[dev]'
	@touch $@

demo: $(STAMP)
	$(PY) tools/demo.py --out demo

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) demo runs .pytest_cache
