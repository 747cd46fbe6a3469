#!/usr/bin/env bash
# The GPU check: one call on the GPU machine (one H200, no network), at most 9 minutes.
#
#   bash bench/gpu_kit.sh                  # here, once: the wheels that machine lacks, and PTB, into .whl/
#   bash bench/gpu_rehearsal.sh            # here: this script on CPU, in that machine's Python and torch
#   bash bench/gpu_check.sh OUT_DIR        # there (device call with carry [".whl"]; OUT_DIR under $OUT)
#
# It installs the kit beside the machine's own torch (pip --no-index --no-deps --target, then PYTHONPATH, with the
# checkout itself: nothing is installed from it), then
# runs each step under its own time limit, the limits adding up to 9 minutes (the install's included). Each step
# writes as it goes: its output to OUT_DIR/log.txt, its figures to OUT_DIR/rows.jsonl and OUT_DIR/table.md, its
# exit status and time to OUT_DIR/steps.tsv, so a step killed at its limit leaves what it measured. Standard output
# is the report (what `bench/report.py gpu_check` records): the table of figures and the steps' times against their
# limits. Exits 1 if a step failed or ran out of time, 2 if the kit is missing or does not install.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
py=${PYTHON:-python3}
site=${KIT_SITE:-/tmp/dsrecipes-kit}
mkdir -p "$out"
log="$out/log.txt"
: >"$out/steps.tsv"
total=0
failed=0

step() {  # NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  total=$((total + limit))
  echo "+ [$name, limit ${limit}s] $*" >>"$log"
  timeout --kill-after=5 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" >>"$out/steps.tsv"
  echo "gpu_check: $name exit $rc after $((SECONDS - t0)) s (limit $limit s)" >&2
  [ "$rc" -eq 0 ] || failed=1
  return "$rc"
}

ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu_check: no wheels in .whl/: run bash bench/gpu_kit.sh first (and carry .whl)"; exit 2; }
step kit 30 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
  .whl/*.whl || { echo "gpu_check: the kit did not install (see $log)"; exit 2; }
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH" DSRECIPES_DATA="$PWD/.whl/data"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

step versions 20 "$py" bench/gpu_check.py versions --out "$out"
step tests 160 "$py" -m pytest -q -p no:xdist -p no:cacheprovider -rs tests/gpu/test_gpu.py
step syncs 60 "$py" bench/gpu_check.py syncs --out "$out"
step awd 100 "$py" bench/gpu_check.py awd --out "$out"
step vision 130 "$py" bench/gpu_check.py vision --out "$out"
step loader 40 "$py" bench/gpu_check.py loader --out "$out"

# the report: figures, then every step against its limit (the limits add up to $total s)
"$py" - "$out" "$total" <<'EOF'
import json, platform, sys, time
from pathlib import Path
out, total = Path(sys.argv[1]), int(sys.argv[2])
from bench.gpu_check import Table
from harness.reporting import markdown_table
print(f"gpu_check on {platform.node()}, python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M %Z')}")
print("command: bash bench/gpu_check.sh " + sys.argv[1] + "\n")
print(Table(out).render() + "\n")
steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
print(markdown_table(["step", "exit status", "seconds", "limit s"], steps))
used = sum(int(s[2]) for s in steps)
print(f"\n{used} s of the {total} s the limits allow ({total / 60:.1f} min); pytest's output is in {out}/log.txt")
EOF
[ "$failed" -eq 0 ] && echo "verdict: every step passed within its limit" || echo "verdict: a step failed or ran out of time (see $log)"
exit "$failed"
