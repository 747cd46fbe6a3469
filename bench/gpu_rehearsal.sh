#!/usr/bin/env bash
# Rehearse bench/gpu_check.sh here, on CPU, as the GPU machine will run it: a Python 3.12 virtual environment
# holding only what that machine has, at its versions (torch 2.11.0, torchvision 0.26.0, numpy 2.5, timm,
# tensorboard, pytest, pytest-timeout, Pillow, PyYAML, tqdm, psutil, matplotlib; no DeepSpeed, no pydantic), the
# kit from bench/gpu_kit.sh installed the way the check installs it, and the whole check run to its end (the
# GPU-only tests skip with a reason; the measuring parts run at smoke scale). A missing import, a version mismatch
# or a wrong path shows up here, where it costs no device time.
#
#   bash bench/gpu_rehearsal.sh [OUT_DIR]      # default runs/gpu-rehearsal; REHEARSAL_VENV picks the environment
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu-rehearsal}
venv=${REHEARSAL_VENV:-$HOME/.cache/dsrecipes/gpu-rehearsal-py312}
python312=$(command -v python3.12 || ls -d "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.12*/bin/python3 | tail -1)
if [ ! -x "$venv/bin/python" ]; then
  "$python312" -m venv "$venv"
  "$venv/bin/pip" install -q 'torch==2.11.0' 'torchvision==0.26.0' 'numpy==2.5.*' timm tensorboard pytest \
    pytest-timeout Pillow PyYAML tqdm psutil matplotlib
fi
for absent in deepspeed pydantic webdataset submitit hjson; do  # what the GPU machine lacks must come from the kit
  if "$venv/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$absent') is None)"; then
    echo "gpu_rehearsal: $venv has $absent, which the GPU machine lacks: use an environment without it"; exit 2
  fi
done
[ -d .whl ] || bash bench/gpu_kit.sh
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
rm -rf "$out"
PYTHON="$venv/bin/python" KIT_SITE="$site" bash bench/gpu_check.sh "$out"
