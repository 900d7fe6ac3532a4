# Two commands for a fresh machine:
#   make reproduce   set up .venv (if missing) and run the main job: snakemake reproduce_table1 (toy settings)
#                    and its figures (reproduce_figures: Fig. 3, a few seconds more)
#   make test        set up .venv (if missing) and run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup reproduce test clean-results

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

reproduce: setup
	snakemake --cores all reproduce_table1 reproduce_figures

test: setup
	python -m pytest -q --durations=15

clean-results:
	rm -rf results .snakemake mlflow.db mlruns
