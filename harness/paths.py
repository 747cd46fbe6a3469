"""Where things are: the checkout, this interpreter's bin/, the shared data (``$DSRECIPES_DATA`` or
``../shared/data`` beside the checkout) and scratch folders for the benchmarks' runs."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHARED_DATA = Path(os.environ.get("DSRECIPES_DATA") or REPO.parent / "shared" / "data").resolve()
PTB_DIR = SHARED_DATA / "ptb"
# "../shared/data", as the README spells it, when the data sits beside the checkout
DATA_ROOT = os.path.relpath(SHARED_DATA, REPO) if SHARED_DATA.is_relative_to(REPO.parent) else str(SHARED_DATA)


def scratch_dir(prefix: str) -> Path:
    """Run directories under runs/bench/ (git-ignored), removed by ``cleanup``."""
    root = REPO / "runs" / "bench"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


def cleanup(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
