# The targets README's quickstart and .ci/run call.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.plait-installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

# torch first (pinned), then plait without build isolation: deepspeed ships as an sdist whose
# setup.py imports torch, and an isolated build environment would resolve an unpinned torch
# (a CUDA build of several GB) instead of using the one just installed.
$(STAMP): pyproject.toml setup.py requirements/torch-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=68" wheel
	$(BIN)/python -m pip install -q -r requirements/torch-cpu.txt
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[dev,eval]"
	touch $@

demo: setup
	$(BIN)/python -m plait.launcher.train --config configs/tiny.yaml

# Two pytest workers, each test file on one worker (its module fixtures built once): most of
# the suite's time is subprocesses (torchrun jobs, exports, a Slurm cluster) that wait on
# imports and rendezvous with a core idle; 20 min serially, 14 with two workers (2 cores).
test: setup lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
