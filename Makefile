# `make repro` sets everything up and runs the pipeline; `make test` sets up and runs the tests.
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
PYTHON ?= python3
# DVC runs each stage's `python` from PATH: put the environment's first.
RUN := PATH="$(BIN):$$PATH"

.PHONY: setup repro test lint clean

setup: $(VENV)/.installed

# torch through pip, which takes the CPU wheel (an unpinned index would pull GBs of CUDA packages),
# then compiled to bytecode on every core; the rest through uv, several times faster than pip.
# Bytecode at install time: where PYTHONDONTWRITEBYTECODE is set, every stage would compile its
# imports again.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile torch==2.13.0 uv==0.13.9
	$(BIN)/python -m compileall -q -j 0 -x /testing/_internal/ $(VENV)/lib/python3*/site-packages/torch
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -r requirements-dev.txt
	touch $@

repro: setup
	$(RUN) dvc repro

test: setup
	$(RUN) python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV)
