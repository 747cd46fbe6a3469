#!/usr/bin/env bash
# The GPU checks on a machine with one GPU, in under 8 minutes: tests/test_gpu.py, then the GPU rows of the
# benchmarks at short settings (1 rank: two ranks cannot share one GPU under NCCL). Each command is printed before
# its output; the script exits non-zero if any of them fails. (bench/weight_drop_cost.py times CPU only and
# bench/awd_throughput.py always adds 2-rank rows, so neither runs here.) Uses .venv, made as .ci/run makes it if absent.
set -uo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null && nvidia-smi -L || { echo "gpu_check: no NVIDIA GPU here (nvidia-smi missing or failing)"; exit 2; }
[ -x .venv/bin/python ] || { python3 -m venv --clear .venv && .venv/bin/pip install -q -e '.[test]'; } || exit 2
.venv/bin/python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' \
  || { echo "gpu_check: torch in .venv sees no CUDA device"; exit 2; }

failed=0
step() { echo "+ $*"; timeout "${LIMIT:-300}" "$@" || { echo "gpu_check: FAILED ($?): $*"; failed=1; }; }
step .venv/bin/python -m pytest -q -p no:xdist -rs tests/test_gpu.py
LIMIT=120 step .venv/bin/python bench/imagenet_throughput.py --models vit_tiny_patch16_224 --ranks 1 --batch 64 --steps 8
exit $failed
