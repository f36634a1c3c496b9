# torchmdx: two commands do all set-up on a fresh machine.
#   make demo   install, train a small model on shipped real data, run MD, print where results are
#   make test   install and run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := runs/demo

.PHONY: install test test-fast demo bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow" tests

demo: $(STAMP)
	$(BIN)/python -m torchmdx.cli demo --out $(DEMO)

bench: $(STAMP)
	$(BIN)/python bench/bench_data.py

clean:
	rm -rf $(VENV) runs .pytest_cache
