"""Which source lines make the host wait for the device: CUDA's sync debug mode, counted by source.

A training step is meant to read one value back (the step guard's agreement); every other read-back or blocking
copy stalls the host while the device drains its queue. ``torch.cuda.set_sync_debug_mode("warn")`` warns at each
one, and the warning carries the Python line that caused it, so a new one is named, not only counted
(tests/gpu/test_gpu.py; bench/gpu_check.py syncs).
"""

from __future__ import annotations

import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

_REPO = Path(__file__).resolve().parents[1]


def _where(w: warnings.WarningMessage) -> str:
    path = Path(w.filename)
    if path.is_relative_to(_REPO):
        return f"{path.relative_to(_REPO)}:{w.lineno}"
    parts = path.parts  # a library's own line: name it from its package down
    for i, part in enumerate(parts):
        if part in ("site-packages", "dist-packages"):
            return f"{'/'.join(parts[i + 1:])}:{w.lineno}"
    return f"{path}:{w.lineno}"


@contextmanager
def count_host_syncs() -> Iterator[Counter]:
    """Counts, by ``file:line``, the synchronizing CUDA calls made inside the block (empty off CUDA)."""
    counts: Counter = Counter()
    if not torch.cuda.is_available():
        yield counts
        return
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counts
        finally:
            torch.cuda.set_sync_debug_mode("default")
    counts.update(_where(w) for w in caught if "synchroniz" in str(w.message))


def per_step(few: Counter, more: Counter, extra_steps: int) -> dict[str, float]:
    """Syncs per step by source, from two runs ``extra_steps`` apart: whatever happens once per run (start-up,
    the final validation and checkpoint) cancels out."""
    return {src: (more[src] - few.get(src, 0)) / extra_steps for src in more
            if more[src] != few.get(src, 0)}
