# The two commands of the README's Quick start. Each one sets up everything it needs in .venv
# (the CPU build of torch 2.13.0 is pinned: a plain torch requirement would pull a CUDA build),
# builds lorecomm._C against that torch, then runs:
#   make demo   the main job: dense vs torch PowerSGD vs Lore vs GreedyLore (bench/compare.py)
#   make test   the test suite (what .ci/run runs)
# Set PYTHON to pick the interpreter (default python3, 3.10+), MAX_JOBS for parallel compile jobs.
PYTHON ?= python3
VENV ?= .venv
MAX_JOBS ?= 2
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check
CONSTRAINTS := requirements/constraints-cpu.txt
STAMP := $(VENV)/.lorecomm-installed

.PHONY: demo test build clean

$(STAMP): setup.py pyproject.toml $(wildcard requirements/*.txt)
	$(PYTHON) -m venv $(VENV)
	$(PIP) -c $(CONSTRAINTS) "torch==2.13.0" numpy pytest pybind11 triton cmake ninja "setuptools>=64" wheel
	DS_BUILD_OPS=0 MAX_JOBS=$(MAX_JOBS) $(PIP) --no-build-isolation -c $(CONSTRAINTS) -e ".[triton,bench,integrations]"
	touch $(STAMP)

# incremental: CMake rebuilds lorecomm._C only where csrc/ changed
build: $(STAMP)
	MAX_JOBS=$(MAX_JOBS) $(PY) setup.py -q build_ext --inplace

demo: build
	$(PY) bench/compare.py

test: build
	$(PY) -c 'import torch, lorecomm.ops as ops; print("torch", torch.__version__, "| lorecomm ops:", ops.BACKEND)'
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build lorecomm/_C*.so
