# `make repro` sets everything up and runs the pipeline; `make test` sets up and runs the tests.
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
PYTHON ?= python3
# DVC runs each stage's `python` from PATH: put the environment's first. Each stage is a new Python
# process: with PYTHONDONTWRITEBYTECODE set, every one would compile its imports again.
RUN := PATH="$(BIN):$$PATH" PYTHONDONTWRITEBYTECODE=

.PHONY: setup repro test lint clean

setup: $(VENV)/.installed

# torch through pip, which takes the CPU wheel (an unpinned index would pull GBs of CUDA packages);
# the rest through uv, several times faster than pip. Neither compiles bytecode: Python writes it
# when a module is first imported, so only what runs gets compiled (45 s at install otherwise).
$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile torch==2.13.0 uv==0.13.9
	$(BIN)/uv pip install -q --python $(BIN)/python -r requirements-dev.txt
	touch $@

repro: setup
	$(RUN) dvc repro

test: setup
	$(RUN) python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV)
