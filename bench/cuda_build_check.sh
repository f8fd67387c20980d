#!/usr/bin/env bash
# Builds lorecomm's C++ extension with LORECOMM_WITH_CUDA against the GPU machine's versions (torch 2.11.0
# + CUDA 13, Triton 3.6.0) on a machine without a GPU, and runs the CPU suite on them.
#
#   bench/cuda_build_check.sh [WORKDIR]        default WORKDIR /tmp/lorecomm-torch211
#
# Into WORKDIR it puts a throwaway venv (torch 2.11.0, its CUDA 13 runtime wheels, triton 3.6.0, pybind11,
# pytest, cmake, ninja, the bench and integration extras: about 4 GB from the package registry, by hand, not
# in CI; WHEELS=dir is searched first) and a copy of this checkout (tracked and untracked-not-ignored
# files), builds the extension there with nvcc (NVCC=path, else nvcc on PATH, else /usr/local/cuda/bin/nvcc), checks it is a CUDA build
# (lorecomm._C.ENGINE_CUDA), compiles every Triton kernel for sm_90 with Triton 3.6
# (bench/kernels_static.py --check), and runs the test suite (no GPU: the CUDA tests skip, every
# CPU test must pass). Exit status non-zero on any failure; the log of each stage is in WORKDIR/logs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${1:-/tmp/lorecomm-torch211}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$WORK/logs"
log() { echo "[cuda_build_check $(date +%H:%M:%S)] $*"; }

NVCC="${NVCC:-$(command -v nvcc || true)}"
[ -n "$NVCC" ] || NVCC=/usr/local/cuda/bin/nvcc
[ -x "$NVCC" ] || { echo "nvcc not found: set NVCC=/path/to/nvcc (CUDA 13; pip install nvidia-cuda-nvcc)" >&2; exit 2; }

if [ ! -x "$WORK/venv/bin/python" ]; then
  log "venv $WORK/venv"
  "$PYTHON" -m venv "$WORK/venv"
fi
PY="$WORK/venv/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check)
[ -n "${WHEELS:-}" ] && PIP+=(--find-links "$WHEELS")
# numpy < 2.4: Triton 3.6's interpreter (the CPU suite's) calls int() on one-element arrays, which NumPy 2.4
# refuses ("only 0-dimensional arrays can be converted to Python scalars"); a GPU run compiles instead
if ! "$PY" -c 'import torch, triton, numpy, sys; sys.exit(not (torch.__version__.startswith("2.11.0") and triton.__version__ == "3.6.0" and numpy.__version__ < "2.4"))' 2>/dev/null; then
  log "installing torch 2.11.0 (CUDA 13 build), triton 3.6.0 (log: $WORK/logs/pip.log)"
  "${PIP[@]}" "torch==2.11.0" "triton==3.6.0" "numpy<2.4" pytest pybind11 cmake ninja "setuptools>=64,<82" wheel \
    > "$WORK/logs/pip.log" 2>&1 || { tail -20 "$WORK/logs/pip.log"; exit 1; }
fi
if ! "$PY" -c 'import transformers, sklearn, deepspeed, lightning, accelerate' 2>/dev/null; then
  log "installing the bench and integration extras against that torch (log: $WORK/logs/pip-extras.log)"
  printf 'torch==2.11.0\ntriton==3.6.0\nnumpy<2.4\n' > "$WORK/constraints.txt"
  DS_BUILD_OPS=0 "${PIP[@]}" -c "$WORK/constraints.txt" -r "$ROOT/requirements/extra-bench.txt" \
    -r "$ROOT/requirements/extra-integrations.txt" > "$WORK/logs/pip-extras.log" 2>&1 \
    || { tail -20 "$WORK/logs/pip-extras.log"; exit 1; }
fi
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__)'

log "copying the checkout to $WORK/src"
rm -rf "$WORK/src" && mkdir -p "$WORK/src"
(cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$WORK/src")

log "building with LORECOMM_WITH_CUDA (nvcc $("$NVCC" --version | tail -1)); log: $WORK/logs/build.log"
# editable install: setup.py maps kernels/ to lorecomm.kernels, as for a user
(cd "$WORK/src" && CUDACXX="$NVCC" MAX_JOBS="${MAX_JOBS:-2}" "$PY" -m pip install -v --no-build-isolation --no-deps -e .) \
  > "$WORK/logs/build.log" 2>&1 || { grep -E "error|Error" "$WORK/logs/build.log" | head -40; exit 1; }
grep -q "lorecomm: CUDA sources ON" "$WORK/logs/build.log" || { echo "CMake did not enable CUDA" >&2; grep "lorecomm:" "$WORK/logs/build.log"; exit 1; }
(cd "$WORK/src" && "$PY" -c 'import lorecomm._C as C, sys; print("ENGINE_CUDA", C.ENGINE_CUDA); sys.exit(not C.ENGINE_CUDA)')

log "Triton 3.6: every kernel configuration compiled for sm_90 (log: $WORK/logs/static.log)"
(cd "$WORK/src" && "$PY" bench/kernels_static.py --check --out -) > "$WORK/logs/static.log" 2>&1 \
  || { tail -20 "$WORK/logs/static.log"; exit 1; }
grep "finding(s)" "$WORK/logs/static.log"

log "test suite on torch 2.11 / Triton 3.6 (log: $WORK/logs/pytest.log)"
(cd "$WORK/src" && "$PY" -m pytest -q -rs -p no:cacheprovider tests) > "$WORK/logs/pytest.log" 2>&1 \
  || { tail -30 "$WORK/logs/pytest.log"; exit 1; }
grep -E "^SKIPPED|passed|failed" "$WORK/logs/pytest.log" | tail -20
log "OK: CUDA build against torch $("$PY" -c 'import torch; print(torch.__version__)'), CPU suite passed"
