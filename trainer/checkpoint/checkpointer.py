"""The engine's one door to checkpoints: ``save`` gathers what a checkpoint holds (client, per-rank and the loop
callbacks' state) and ``restore`` puts it all back, on the world size that wrote it or another. File names, the
save protocol and ZeRO's partitions are layout's, writing's and elastic's; it imports no recipe and no feature."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..distributed import DistContext, broadcast_object
from ..errors import CheckpointError
from ..precision import fp32_state, uses_masters
from ..rng import capture_rng, restore_rng
from .elastic import load_rank_state, load_repartitioned_optimizer, partitions_optimizer, saved_world
from .layout import BEST, FP32_WEIGHTS, callback_file, rank_file
from .tags import choose_resume_tag, read_callback_states
from .writing import recover_interrupted, write

if TYPE_CHECKING:
    from ..callbacks import Callbacks
    from ..recipe import TrainData

log = logging.getLogger("trainer")


def agree_on_resume_tag(ckpt_dir: Path, ctx: DistContext) -> str:
    """Rank 0 repairs an interrupted save and picks the newest checkpoint that verifies; all ranks
    share its answer, an error included, so none waits on a rank that gave up."""
    answer = None
    if ctx.is_main:
        try:
            recover_interrupted(ckpt_dir)
            answer = ("tag", choose_resume_tag(ckpt_dir))
        except CheckpointError as e:
            answer = ("error", str(e))
    kind, value = broadcast_object(answer, ctx)
    if kind == "error":
        raise CheckpointError(value)
    return value


def param_digest(module: torch.nn.Module) -> str:
    """A hash of the parameter bytes: replicas that agree bit for bit have equal digests."""
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Checkpointer:
    """DeepSpeed checkpoints plus what DeepSpeed does not keep: every rank's private state.

    DeepSpeed saves the module, optimizer and scheduler, and the client state once (rank 0): the loop's state,
    the training stream's and the recipe's signature. Exact resume also needs each rank's RNG streams and stream
    state (e.g. a carried LSTM hidden state); those go to ``<tag>/rank_NNNNN.pt`` next to DeepSpeed's files. Each
    loop callback's state is saved whole (``callback_<name>.pt``, e.g. NT-ASGD's average), so it loads on any
    world size. Under bf16 DeepSpeed's module file holds the bf16 copies and the fp32 masters are cut into its
    optimizer files; ``fp32_weights.pt`` keeps them whole, by name, for what reads a checkpoint's weights without an
    engine (``train.init_from``, evaluate.py).
    """

    def __init__(self, engine, ckpt_dir: Path, ctx: DistContext, keep_last: int):
        self.engine = engine
        self.dir = Path(ckpt_dir)
        self.ctx = ctx
        self.keep_last = keep_last

    def save(self, tag: str, trainer_state: dict, data: TrainData, callbacks: Callbacks, signature: dict) -> Path:
        """Checkpoint ``tag`` of the loop (``trainer_state``), the training stream and the callbacks, written
        atomically. ``best`` holds the weights evaluation saw (an average swapped in), keeps no callback state and
        does not become ``latest``."""
        best = tag == BEST
        shared = {}
        if not best:
            for name, state in callbacks.states().items():  # may be collectives: every rank asks
                shared[callback_file(name)] = state
        if uses_masters(list(self.engine.module.parameters())):
            shared[FP32_WEIGHTS] = fp32_state(self.engine.module)  # a collective: every rank saves
        client_state = {
            "trainer": trainer_state,
            "recipe": data.state_dict(),  # the recipe's training stream
            "signature": signature,
        }
        rank_state = {
            "rng": capture_rng(),
            "recipe": data.rank_state_dict(),
            "param_digest": param_digest(self.engine.module),
            "rank": self.ctx.rank,
            "world": self.ctx.world,
        }
        return write(self.engine, self.dir, self.ctx, tag, client_state, rank_state, shared,
                     save_latest=not best, keep_last=self.keep_last, on_staged=callbacks.on_staged)

    def restore(self, tag: str, data: TrainData, callbacks: Callbacks, global_batch: int) -> dict:
        """Continue from ``tag``, on the world size it was written by or on another (elastic resume): the global
        batch is the same, so the data position means the same samples; ZeRO's partitioned optimizer state is
        re-cut for this world and the training stream re-splits its per-rank state. Loads the engine, the stream,
        the callbacks and this rank's RNG streams; returns the loop's saved state (:meth:`save`'s
        ``trainer_state``)."""
        tag_dir = self.dir / tag
        written_by = saved_world(tag_dir, self.ctx.world)
        elastic = written_by != self.ctx.world
        if elastic and partitions_optimizer(self.engine.optimizer):
            client, _ = self.load(tag, optimizer_states=False)
            load_repartitioned_optimizer(self.engine.optimizer, tag_dir, tag, written_by)
            own = None
        else:
            client, own = self.load(tag)
        trainer_state = client["trainer"]
        stream = client.get("recipe", {})
        if "position" in trainer_state and "position" not in stream:  # written before streams kept their position
            stream = {**stream, "position": trainer_state["position"]}
        data.load_state_dict(stream)
        callbacks.load_states(read_callback_states(self.dir, tag))
        if elastic:
            data.load_rank_states([load_rank_state(tag_dir, r)["recipe"] for r in range(written_by)])
            log.info("checkpoint %s was written by %d rank(s) and continues on %d (global batch %d unchanged); "
                     "per-rank RNG streams start fresh", tag, written_by, self.ctx.world, global_batch)
        elif own is not None:
            restore_rng(own["rng"])
            data.load_rank_state_dict(own["recipe"])
        else:
            log.warning("checkpoint %s has no per-rank state; per-rank RNG and state start fresh", tag)
        return trainer_state

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
