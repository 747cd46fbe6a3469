"""DeepSpeed checkpoints plus what DeepSpeed does not keep: every rank's private state.

DeepSpeed saves the module, optimizer and scheduler, and the client state once (rank 0). Exact
resume also needs each rank's RNG streams and recipe state (e.g. a carried LSTM hidden state);
those go to ``<tag>/rank_NNNNN.pt`` next to DeepSpeed's files, written before DeepSpeed moves
``latest``, so ``latest`` never names a tag with missing rank files.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import torch

from .distributed import DistContext, barrier
from .optim.sharded_average import copy_flat_into
from .errors import CheckpointError

BEST = "best"
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


def read_latest_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def resolve_tag(ckpt_dir: Path, which: str) -> str:
    """``best``, ``latest`` or an explicit tag, checked to exist."""
    tag = read_latest_tag(ckpt_dir) if which == "latest" else which
    if tag is None or not (ckpt_dir / tag / MODEL_STATES).is_file():
        raise CheckpointError(f"no '{which}' checkpoint in {ckpt_dir}; train the run further or pick another --checkpoint")
    return tag


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
        tag_dir = self.dir / tag
        tag_dir.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save(rank_state, rank_file(tag_dir, self.ctx.rank))
        if self.ctx.is_main:
            for name, obj in (shared or {}).items():
                _atomic_torch_save(obj, tag_dir / name)
        barrier(self.ctx)
        self.engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=save_latest)
        if self.ctx.is_main and save_latest:
            self._prune()
        barrier(self.ctx)
        return tag_dir

    def _prune(self) -> None:
        latest = read_latest_tag(self.dir)
        steps = sorted(p.name for p in self.dir.iterdir() if p.is_dir() and STEP_TAG.match(p.name))
        for name in steps[: max(0, len(steps) - self.keep_last)]:
            if name != latest:
                shutil.rmtree(self.dir / name, ignore_errors=True)

    def load(self, tag: str, module_only: bool = False) -> tuple[dict, dict | None]:
        """Load ``tag`` into the engine; returns DeepSpeed's client state and this rank's own state."""
        path, client = self.engine.load_checkpoint(
            str(self.dir),
            tag=tag,
            load_module_only=module_only,
            load_optimizer_states=not module_only,
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
    for key in sorted(set(mine) & set(theirs)):
        if mine[key] != theirs[key]:
            raise CheckpointError(
                f"checkpoint {tag} has {key} {theirs[key]!r} but this run has {mine[key]!r}; "
                "use the run's own config and data"
            )
