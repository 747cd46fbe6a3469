#!/usr/bin/env python
"""Run a sweep file's grid: ``python launch/sweep.py SWEEP.yaml --backend local|slurm|hostfile [--dry-run] [--summarize]``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.cli import guarded  # noqa: E402
from trainer.sweeps.cli import sweep, sweep_parser  # noqa: E402

if __name__ == "__main__":
    sys.exit(guarded(sweep, sweep_parser()))
