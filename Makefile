# torchmdx: two commands do all set-up on a fresh machine.
#   make demo   install, train a small model on shipped real data, run MD, print where results are
#   make test   install and run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := runs/demo

.PHONY: install test test-slow test-all demo bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# make test: every case not marked slow (the suite kept under 15 minutes on 2 cores);
# make test-slow: the slow cases (real compile children, multi-process DDP, long training
# runs); make test-all: both in one pytest run. CI (.ci/run) runs test, then test-slow.
# TEST_WORKERS=0: one process (pytest-xdist off)
TEST_WORKERS ?= 2
PYTEST = $(BIN)/python -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile
test: $(STAMP)
	$(PYTEST) -m "not slow" tests

test-slow: $(STAMP)
	$(PYTEST) -m slow tests

test-all: $(STAMP)
	$(PYTEST) tests

# demo (the training helper's target): train configs/demo.yaml into $(DEMO) (a fresh run each
# time), evaluate it on the held-out frames, run 1 ps of Langevin MD of ethanol with the model
demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/python -m torchmdx.cli train configs/demo.yaml --run-dir $(DEMO)
	$(BIN)/python -m torchmdx.cli evaluate $(DEMO)/model.pt --data configs/demo.yaml --run $(DEMO) --out $(DEMO)/evaluate --threads 1
	$(BIN)/python -c "from ase.build import molecule; from ase.io import write; write('$(DEMO)/ethanol.xyz', molecule('CH3CH2OH'))"
	OMP_NUM_THREADS=1 $(BIN)/python -m torchmdx.cli md $(DEMO)/ethanol.xyz --model $(DEMO)/model.pt --steps 2000 --dt 0.5 \
		--temperature 300 --ensemble langevin --friction 1 --every 20 --out $(DEMO)/md/ethanol.extxyz
	@echo
	@echo "demo results in $(DEMO)/:"
	@echo "  model          $(DEMO)/model.pt  (checkpoints in $(DEMO)/checkpoints/)"
	@echo "  error table    $(DEMO)/evaluate/errors.txt  (and errors.json)"
	@echo "  parity plots   $(DEMO)/evaluate/parity.png"
	@echo "  learning curve $(DEMO)/learning_curve.png  (logs in $(DEMO)/logs/)"
	@echo "  MD trajectory  $(DEMO)/md/ethanol.extxyz  (thermo log $(DEMO)/md/ethanol.csv, plot $(DEMO)/md/ethanol.png)"

bench: $(STAMP)
	$(BIN)/python bench/bench_data.py

clean:
	rm -rf $(VENV) runs .pytest_cache
