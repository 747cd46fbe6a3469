#!/usr/bin/env python
"""Evaluate a run's checkpoint on any number of ranks: ``python launch/evaluate.py --run-dir DIR``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.cli import evaluate_parser, guarded  # noqa: E402
from trainer.commands import evaluate  # noqa: E402

if __name__ == "__main__":
    sys.exit(guarded(evaluate, evaluate_parser()))
