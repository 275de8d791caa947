# make demo   set up .venv and run the whole pipeline on the bundled digits data
#             (local Ray head + MLflow server, train, tune, promote, serve, predictions)
# make stop   stop the Ray head and MLflow server that make demo started
# make test   set up .venv and run the whole test suite
# make local  train + evaluate on the digits in one process, without Ray
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup demo stop local test clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/python cluster/local/demo.py

stop:
	bash cluster/local/stop.sh

local: setup
	$(BIN)/python -m jobs.train_local --config configs/digits.yaml

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

clean-runs:
	rm -rf runs
