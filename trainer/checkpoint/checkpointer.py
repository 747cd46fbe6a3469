"""The engine's one door to checkpoints: ``save`` writes a tag's client, per-rank and shared state and ``load``
puts a tag back into the engine. File names and the save protocol are layout's and writing's."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from ..distributed import DistContext
from ..errors import CheckpointError
from .layout import rank_file
from .writing import write

log = logging.getLogger("trainer")


def param_digest(module: torch.nn.Module) -> str:
    """A hash of the parameter bytes: replicas that agree bit for bit have equal digests."""
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Checkpointer:
    """DeepSpeed checkpoints plus what DeepSpeed does not keep: every rank's private state.

    DeepSpeed saves the module, optimizer and scheduler, and the client state once (rank 0). Exact resume also
    needs each rank's RNG streams and recipe state (e.g. a carried LSTM hidden state); those go to
    ``<tag>/rank_NNNNN.pt`` next to DeepSpeed's files.
    """

    def __init__(self, engine, ckpt_dir: Path, ctx: DistContext, keep_last: int):
        self.engine = engine
        self.dir = Path(ckpt_dir)
        self.ctx = ctx
        self.keep_last = keep_last

    def save(self, tag: str, client_state: dict, rank_state: dict, save_latest: bool = True,
             shared: dict[str, dict] | None = None) -> Path:
        """``shared`` files (name -> object) are the same on every rank and written once, by rank 0."""
        return write(self.engine, self.dir, self.ctx, tag, client_state, rank_state, shared or {},
                     save_latest=save_latest, keep_last=self.keep_last)

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
