# `make repro` sets everything up and runs the pipeline; `make test` sets up and runs the tests.
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
PYTHON ?= python3
# DVC runs each stage's `python` from PATH: put the environment's first.
RUN := PATH="$(BIN):$$PATH"

.PHONY: setup repro test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

repro: setup
	$(RUN) dvc repro

test: setup
	$(RUN) python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV)
