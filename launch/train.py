#!/usr/bin/env python
"""Train a recipe: ``deepspeed [--num_gpus N | --hostfile FILE] launch/train.py --recipe NAME ...``.

Also runs under ``torchrun`` and as plain ``python`` (one process).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.cli import guarded, train_parser  # noqa: E402
from trainer.commands import train  # noqa: E402

if __name__ == "__main__":
    sys.exit(guarded(train, train_parser()))
