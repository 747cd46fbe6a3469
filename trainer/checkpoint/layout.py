"""Where things are in a checkpoint directory: the tag names, the files a tag holds, and how to list the tags.
It reads no checkpoint's contents and writes nothing; the other checkpoint modules name every file through it."""

from __future__ import annotations

import re
from pathlib import Path

BEST = "best"
LATEST = "latest"  # the file naming the newest complete step checkpoint
PARTIAL = ".partial"  # a save in progress (or one a crash interrupted)
REPLACED = ".old"  # the previous copy of a tag being replaced, until the new one is in place
MANIFEST = "manifest.json"
STEP_TAG = re.compile(r"^step_(\d+)$")
MODEL_STATES = "mp_rank_00_model_states.pt"
FP32_WEIGHTS = "fp32_weights.pt"  # bf16 runs: the parameters' fp32 masters, by name (the module file has bf16)


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def callback_file(name: str) -> str:
    """A loop callback's state (e.g. NT-ASGD's whole average), saved once, independent of the world size."""
    return f"callback_{name}.pt"


CALLBACK_FILE = re.compile(r"^callback_(.+)\.pt$")
# checkpoints written before loop callbacks saved their own state kept NT-ASGD's as averaged.pt
LEGACY_CALLBACK_FILES = {"averaged.pt": "nt_asgd"}


def rank_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rank_{rank:05d}.pt"


_PER_RANK = re.compile(r"^rank_(\d+)\.pt$|zero_pp_rank_(\d+)_")  # ours, and DeepSpeed's partitioned state


def writer_of(name: str) -> int:
    """The rank that writes a checkpoint file: per-rank files name it; every other file is rank 0's."""
    m = _PER_RANK.search(name)
    return int(m.group(1) or m.group(2)) if m else 0


def read_latest_tag(ckpt_dir: Path) -> str | None:
    """The tag ``latest`` names; None when it is missing or holds no tag name (damaged: callers fall back)."""
    try:
        tag = (ckpt_dir / LATEST).read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return tag if STEP_TAG.match(tag) or tag == BEST else None


def has_checkpoints(ckpt_dir: Path) -> bool:
    """``latest`` or any step checkpoint: something a resume can start from (if one verifies)."""
    return (ckpt_dir / LATEST).is_file() or bool(step_tags(ckpt_dir))


def step_tags(ckpt_dir: Path) -> list[str]:
    """Step checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and STEP_TAG.match(p.name))
