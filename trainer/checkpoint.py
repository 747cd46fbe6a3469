"""DeepSpeed checkpoints plus what DeepSpeed does not keep: every rank's private state.

DeepSpeed saves the module, optimizer and scheduler, and the client state once (rank 0). Exact
resume also needs each rank's RNG streams and recipe state (e.g. a carried LSTM hidden state);
those go to ``<tag>/rank_NNNNN.pt`` next to DeepSpeed's files.

A save is atomic: everything is written under ``<tag>.partial/``; once every rank is done, each rank hashes
the files it wrote itself and rank 0 records them all (size, SHA-256, writer) in ``manifest.json`` (never from
its own listing of the directory: on a filesystem shared by several hosts it can lag behind their writes), renames the directory to ``<tag>`` (an existing ``<tag>``,
e.g. ``best``, is moved aside first and removed after) and only then rewrites ``latest`` (temporary file,
then rename). A job killed at any moment leaves the previous checkpoints and ``latest`` intact. Loading
checks the manifest; a resume falls back to the newest checkpoint that passes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from .distributed import DistContext, barrier, gather_to_main
from .optim.sharded_average import copy_flat_into
from .errors import CheckpointError

log = logging.getLogger("trainer")

BEST = "best"
PARTIAL = ".partial"  # a save in progress (or one a crash interrupted)
REPLACED = ".old"  # the previous copy of a tag being replaced, until the new one is in place
MANIFEST = "manifest.json"
STEP_TAG = re.compile(r"^step_(\d+)$")
MODEL_STATES = "mp_rank_00_model_states.pt"
AVERAGE_FILE = "averaged.pt"  # the NT-ASGD state: whole average, independent of the world size


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rank_{rank:05d}.pt"


def param_digest(module: torch.nn.Module) -> str:
    """A hash of the parameter bytes: replicas that agree bit for bit have equal digests."""
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


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


_PER_RANK = re.compile(r"^rank_(\d+)\.pt$|zero_pp_rank_(\d+)_")  # ours, and DeepSpeed's partitioned state


def writer_of(name: str) -> int:
    """The rank that writes a checkpoint file: per-rank files name it; every other file is rank 0's."""
    m = _PER_RANK.search(name)
    return int(m.group(1) or m.group(2)) if m else 0


def own_entries(tag_dir: Path, rank: int) -> dict[str, dict]:
    """Size and SHA-256 of the files ``rank`` wrote into ``tag_dir`` (a rank always sees its own writes)."""
    return {str(p.relative_to(tag_dir)): {"bytes": p.stat().st_size, "sha256": _sha256(p), "rank": rank}
            for p in _files(tag_dir) if writer_of(p.name) == rank}


def write_manifest(tag_dir: Path, per_rank: list[dict[str, dict]]) -> None:
    """The manifest from every rank's own entries; a rank that listed not even its own small file failed to save."""
    missing = [r for r, entries in enumerate(per_rank) if rank_file(tag_dir, r).name not in entries]
    if missing:
        raise CheckpointError(f"checkpoint {tag_dir.name}: rank(s) {missing} did not write their rank_NNNNN.pt; the "
                              "save failed, the previous checkpoints are kept: check the run directory's disk")
    entries = {name: entry for part in per_rank for name, entry in sorted(part.items())}
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


def read_latest_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def step_tags(ckpt_dir: Path) -> list[str]:
    """Step checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and STEP_TAG.match(p.name))


def resolve_tag(ckpt_dir: Path, which: str) -> str:
    """``best``, ``latest`` or an explicit tag, checked to exist and to match its manifest."""
    tag = read_latest_tag(ckpt_dir) if which == "latest" else which
    if tag is None or not (ckpt_dir / tag / MODEL_STATES).is_file():
        raise CheckpointError(f"no '{which}' checkpoint in {ckpt_dir}; train the run further or pick another --checkpoint")
    problem = verify(ckpt_dir, tag)
    if problem:
        raise CheckpointError(f"checkpoint {ckpt_dir / tag} is damaged: {problem}; pick another --checkpoint "
                              f"(step tags: {', '.join(step_tags(ckpt_dir)) or 'none'})")
    return tag


def choose_resume_tag(ckpt_dir: Path) -> str:
    """``latest`` if it verifies, else the newest step checkpoint that does, each rejection logged."""
    latest = read_latest_tag(ckpt_dir)
    candidates = ([latest] if latest else []) + [t for t in reversed(step_tags(ckpt_dir)) if t != latest]
    rejected = []
    for tag in candidates:
        problem = verify(ckpt_dir, tag)
        if problem is None:
            if rejected:
                log.warning("resuming from %s instead: %s", tag, "; ".join(rejected))
            return tag
        rejected.append(f"checkpoint {tag} is unusable ({problem})")
    raise CheckpointError(f"no usable checkpoint in {ckpt_dir}: {'; '.join(rejected) or 'none written'}; "
                          "start a new run in another --run-dir")


def _load_file(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise CheckpointError(f"checkpoint file {path} cannot be read ({type(e).__name__}); it is corrupt or truncated: "
                              "use an earlier checkpoint or start a new run") from None


def read_client_state(ckpt_dir: Path, tag: str) -> dict:
    """The client state saved by DeepSpeed, read without an engine (to validate before loading)."""
    state = _load_file(ckpt_dir / tag / MODEL_STATES)
    return {k: v for k, v in state.items() if k in ("trainer", "recipe", "signature")}


def load_weights(module: torch.nn.Module, ckpt_dir: Path, tag: str) -> None:
    """The weights a checkpoint stands for, into a bare module (before DeepSpeed wraps it, so any ZeRO
    stage starts from them): its saved module, with the iterate average swapped in when it kept one."""
    module.load_state_dict(_load_file(ckpt_dir / tag / MODEL_STATES)["module"])
    average = read_average_state(ckpt_dir, tag)
    if average is not None and average.get("average") is not None:
        copy_flat_into(module, average["average"])


def read_average_state(ckpt_dir: Path, tag: str) -> dict | None:
    path = ckpt_dir / tag / AVERAGE_FILE
    return _load_file(path) if path.is_file() else None


class Checkpointer:
    def __init__(self, engine, ckpt_dir: Path, ctx: DistContext, keep_last: int):
        self.engine = engine
        self.dir = Path(ckpt_dir)
        self.ctx = ctx
        self.keep_last = keep_last

    def save(self, tag: str, client_state: dict, rank_state: dict, save_latest: bool = True,
             shared: dict[str, dict] | None = None) -> Path:
        """``shared`` files (name -> object) are the same on every rank and written once, by rank 0."""
        staging = self.dir / (tag + PARTIAL)
        if self.ctx.is_main and staging.exists():
            shutil.rmtree(staging)
        barrier(self.ctx)
        staging.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save(rank_state, rank_file(staging, self.ctx.rank))
        if self.ctx.is_main:
            for name, obj in (shared or {}).items():
                _atomic_torch_save(obj, staging / name)
        barrier(self.ctx)
        self.engine.save_checkpoint(str(self.dir), tag=staging.name, client_state=client_state, save_latest=False)
        per_rank = gather_to_main(own_entries(staging, self.ctx.rank), self.ctx)  # every rank's files are complete
        if self.ctx.is_main:
            write_manifest(staging, per_rank)
            _publish(self.dir, tag)
            if save_latest:
                _atomic_write_text(self.dir / "latest", tag)
                self._prune()
        barrier(self.ctx)
        return self.dir / tag

    def _prune(self) -> None:
        latest = read_latest_tag(self.dir)
        steps = step_tags(self.dir)
        for name in steps[: max(0, len(steps) - self.keep_last)]:
            if name != latest:
                shutil.rmtree(self.dir / name, ignore_errors=True)

    def load(self, tag: str, module_only: bool = False, optimizer_states: bool = True) -> tuple[dict, dict | None]:
        """Load ``tag`` into the engine; returns DeepSpeed's client state and this rank's own state.
        ``optimizer_states=False`` leaves the optimizer to the caller (an elastic resume re-cuts it)."""
        path, client = self.engine.load_checkpoint(
            str(self.dir),
            tag=tag,
            load_module_only=module_only,
            load_optimizer_states=optimizer_states and not module_only,
            load_lr_scheduler_states=not module_only,
        )
        if path is None:
            raise CheckpointError(f"checkpoint {self.dir / tag} could not be loaded; resume from an earlier tag")
        own = rank_file(self.dir / tag, self.ctx.rank)
        rank_state = torch.load(own, map_location="cpu", weights_only=False) if own.is_file() else None
        return client or {}, rank_state


def check_signature(mine: dict, saved: dict, tag: str) -> None:
    """Refuse a checkpoint of another vocabulary or model shape with a message instead of a shape error."""
    theirs = saved.get("signature", {})
    if theirs and not set(mine) & set(theirs):
        raise CheckpointError(f"checkpoint {tag} is of another recipe family ({', '.join(sorted(theirs))}); "
                              "use a checkpoint of this recipe's own runs")
    for key in sorted(set(mine) & set(theirs)):
        if mine[key] != theirs[key]:
            raise CheckpointError(
                f"checkpoint {tag} has {key} {theirs[key]!r} but this run has {mine[key]!r}; "
                "use the run's own config and data"
            )
