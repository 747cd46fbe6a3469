#!/usr/bin/env bash
# The kit for the GPU machine, which has no network: fills .whl/ (git-ignored; a device call carries it) with
# wheels of what that machine lacks, for its CPython 3.12 on manylinux x86-64, each pinned to the version this
# project is tested with (the one in .venv, which .ci/run builds), and with Penn Treebank for the AWD-LSTM parts.
# DeepSpeed's PyPI release is a source archive: its wheel is built here, pure Python, with its C++/CUDA ops off
# (they build just in time where needed; the GPU check needs none). timm travels too: the dropout schedules look up
# its module names, so the machine's own release is not trusted to match. bench/gpu_check.sh installs the kit with
# `pip install --no-index --no-deps --target DIR .whl/*.whl` over the machine's own torch.
#
#   bash bench/gpu_kit.sh            # then: bash bench/gpu_rehearsal.sh here, bench/gpu_check.sh there
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
kit=.whl
limit_mib=48  # a device call carries at most 64 MiB with the working tree

# What the GPU machine lacks: DeepSpeed and its pure-Python needs, pydantic's, the loaders' and sweeps' extras
lacking=(pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson py-cpuinfo msgpack ninja
         einops webdataset braceexpand submitit cloudpickle timm)
mapfile -t pins < <("$py" - "${lacking[@]}" <<'EOF'
import sys
from importlib.metadata import version
for name in sys.argv[1:]:
    print(f"{name}=={version(name)}")
EOF
)
ds_version=$("$py" -c 'from importlib.metadata import version; print(version("deepspeed"))')

rm -rf "$kit"
mkdir -p "$kit/data/ptb"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$kit" "${pins[@]}"
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-cache-dir --no-deps --no-build-isolation --no-binary deepspeed -w "$kit" \
  "deepspeed==$ds_version"

data=${DSRECIPES_DATA:-../shared/data}
cp "$data"/ptb/{train,valid,test}.txt "$kit/data/ptb/"

count=$(ls "$kit"/*.whl | wc -l)
[ "$count" -eq $((${#lacking[@]} + 1)) ] || { echo "gpu_kit: expected $((${#lacking[@]} + 1)) wheels, got $count"; exit 1; }
ls "$kit"/deepspeed-*-py3-none-any.whl >/dev/null || { echo "gpu_kit: the DeepSpeed wheel is not pure Python"; exit 1; }
size=$(du -sm "$kit" | cut -f1)
[ "$size" -le "$limit_mib" ] || { echo "gpu_kit: $kit is $size MiB, over $limit_mib"; exit 1; }
echo "gpu_kit: $count wheels and PTB in $kit ($size MiB): ${pins[*]} deepspeed==$ds_version"
