"""Writing a checkpoint so that a kill at any moment leaves a usable one, and checking one against its manifest:
staging, the manifest, publishing, recovery after a crash, pruning. It decides nothing about what a checkpoint
holds (the checkpointer hands it the states) and loads none."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from ..distributed import DistContext, barrier, gather_to_main
from ..errors import CheckpointError
from .layout import LATEST, MANIFEST, MODEL_STATES, PARTIAL, REPLACED, rank_file, read_latest_tag, step_tags, writer_of

log = logging.getLogger("trainer")


def write(engine, ckpt_dir: Path, ctx: DistContext, tag: str, client_state: dict, rank_state: dict,
          shared: dict[str, dict], save_latest: bool, keep_last: int,
          on_staged: Callable[[str], None] | None = None) -> Path:
    """Write checkpoint ``tag`` on every rank: DeepSpeed's files, this rank's ``rank_state`` and the ``shared``
    files (name -> object, the same on every rank, written once by rank 0).

    A save is atomic: everything is written under ``<tag>.partial/``; once every rank is done, each rank hashes
    the files it wrote itself and rank 0 records them all (size, SHA-256, writer) in ``manifest.json`` (never
    from its own listing of the directory: on a filesystem shared by several hosts it can lag behind their
    writes), renames the directory to ``<tag>`` (an existing ``<tag>``,
    e.g. ``best``, is moved aside first and removed after) and only then rewrites ``latest`` (temporary file,
    then rename) and prunes step checkpoints beyond ``keep_last``. A job killed at any moment leaves the previous
    checkpoints and ``latest`` intact. Loading checks the manifest; a resume falls back to the newest checkpoint
    that passes.
    """
    staging = ckpt_dir / (tag + PARTIAL)
    if ctx.is_main and staging.exists():
        shutil.rmtree(staging)
    barrier(ctx)
    try:
        staging.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save(rank_state, rank_file(staging, ctx.rank))
        if ctx.is_main:
            for name, obj in shared.items():
                _atomic_torch_save(obj, staging / name)
        barrier(ctx)
        engine.save_checkpoint(str(ckpt_dir), tag=staging.name, client_state=client_state, save_latest=False)
    except RuntimeError as e:  # torch.save's own writer reports a failed write (a full disk) without an errno
        if shutil.disk_usage(ckpt_dir).free < 64 * 2**20:
            raise OSError(errno.ENOSPC, str(e).splitlines()[0], str(staging)) from e
        if "write" in str(e).lower():
            raise OSError(errno.EIO, str(e).splitlines()[0], str(staging)) from e
        raise
    if on_staged is not None:  # every file of this rank written, nothing published (fault injection kills here)
        on_staged(tag)
    per_rank = gather_to_main(own_entries(staging, ctx.rank), ctx)  # every rank's files are complete
    if ctx.is_main:
        write_manifest(staging, per_rank)
        _publish(ckpt_dir, tag)
        if save_latest:
            _atomic_write_text(ckpt_dir / LATEST, tag)
            _prune(ckpt_dir, keep_last)
    barrier(ctx)
    return ckpt_dir / tag


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _files(tag_dir: Path) -> list[Path]:
    return sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def own_entries(tag_dir: Path, rank: int) -> dict[str, dict]:
    """Size and SHA-256 of the files ``rank`` wrote into ``tag_dir`` (a rank always sees its own writes)."""
    return {str(p.relative_to(tag_dir)): {"bytes": p.stat().st_size, "sha256": _sha256(p), "rank": rank}
            for p in _files(tag_dir) if writer_of(p.name) == rank}


def write_manifest(tag_dir: Path, per_rank: list[dict[str, dict]]) -> None:
    """``manifest.json`` from every rank's own entries; a rank that listed not even its own small file failed."""
    missing = [r for r, entries in enumerate(per_rank) if rank_file(tag_dir, r).name not in entries]
    if missing:
        raise CheckpointError(f"checkpoint {tag_dir.name}: rank(s) {missing} did not write their rank_NNNNN.pt; the "
                              "save failed, the previous checkpoints are kept: check the run directory's disk")
    entries = {name: entry for part in per_rank for name, entry in part.items()}
    _atomic_write_text(tag_dir / MANIFEST, json.dumps(dict(sorted(entries.items())), indent=1))


def verify(ckpt_dir: Path, tag: str) -> str | None:
    """Why checkpoint ``tag`` cannot be trusted, or None when every file matches its manifest. A tag
    written before manifests existed passes when its model states are there."""
    tag_dir = ckpt_dir / tag
    if not (tag_dir / MODEL_STATES).is_file():
        return f"{MODEL_STATES} is missing"
    if not (tag_dir / MANIFEST).is_file():
        return None
    try:
        entries = json.loads((tag_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"its {MANIFEST} is unreadable"
    for name, want in entries.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size} bytes where {want['bytes']} were written (truncated)"
        if _sha256(path) != want["sha256"]:
            return f"{name} does not match its SHA-256 (corrupted)"
    return None


def _publish(ckpt_dir: Path, tag: str) -> None:
    """``<tag>.partial`` becomes ``<tag>``; an existing ``<tag>`` is renamed aside first, so at every moment
    one complete copy exists under a name :func:`recover_interrupted` understands."""
    final, staging, old = ckpt_dir / tag, ckpt_dir / (tag + PARTIAL), ckpt_dir / (tag + REPLACED)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_interrupted(ckpt_dir: Path) -> None:
    """After a crash mid-save: drop unfinished ``.partial`` saves, put back a ``.old`` copy whose
    replacement never arrived. Only the training job calls this (on rank 0, before it saves anything)."""
    if not ckpt_dir.is_dir():
        return
    for p in sorted(ckpt_dir.iterdir()):
        if p.is_dir() and p.name.endswith(PARTIAL):
            log.warning("removing %s: a checkpoint save that did not finish", p.name)
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_dir() and p.name.endswith(REPLACED):
            final = p.with_name(p.name[: -len(REPLACED)])
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.rename(p, final)


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    """The newest ``keep_last`` step checkpoints stay, and whichever ``latest`` names."""
    latest = read_latest_tag(ckpt_dir)
    steps = step_tags(ckpt_dir)
    for name in steps[: max(0, len(steps) - keep_last)]:
        if name != latest:
            shutil.rmtree(ckpt_dir / name, ignore_errors=True)
