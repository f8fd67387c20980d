#!/usr/bin/env bash
# The one command to run on a GPU machine (H100/H200, no network, its own torch/Triton/nvcc):
#
#   bench/gpu_check.sh                 # build, CUDA tests, kernel + overlap benches -> bench/results/
#   bench/gpu_check.sh --out DIR       # tables elsewhere (e.g. $OUT on a lent machine)
#   bench/gpu_check.sh --dry-run       # the same on the CPU: interpreter, small sizes (tests/test_gpu_check.py)
#
# At most --budget-s (default 480) seconds; exit status 1 if any stage fails, 2 without a GPU. Writes
# gpu-check-<device>.md (summary), kernels-<device>.md/.json, comm-overlap-<device>.md and
# gpu-check-logs.tar.gz (every stage's log) under the output directory: 5 files. On a copy without .git, set LORECOMM_COMMIT=<sha>.
# Stages and targets: bench/gpu_check.py --help.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
