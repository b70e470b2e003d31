# Setup and the two everyday commands. `make run` and `make test` each set up .venv first.
# torch is installed BEFORE the package, pinned, so pip never resolves a bare `torch` (on a CPU
# machine that would pull gigabytes of CUDA wheels). Elsewhere, override TORCH, e.g.
#   make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
NPROC ?= 2
PY := $(VENV)/bin/python

.PHONY: setup run test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

run: setup
	$(PY) -m torch.distributed.run --nproc-per-node $(NPROC) -m spmd_rlhf.train $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs multirun
