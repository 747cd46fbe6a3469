"""Per-rank loaders: batches of a split that skip undecodable images, kept for the whole run and re-aimed each
epoch (``EpochLoader``), for training (seeded, resumable) and evaluation (every image once over all ranks). It
opens no split and transforms no image: datasets and samplers do."""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from trainer.distributed import DistContext
from trainer.launch_env import cpus_per_rank
from trainer.errors import DataError

from .folder import FolderSplit
from .samplers import BlockSampler, RankSampler, mix_seeds
from .shards import WdsPlan, WdsSplit, count_wds_samples
from .synthetic import SyntheticSplit

log = logging.getLogger(__name__)

# Batches each worker keeps ready. The input rate is set by the worker count, not by this: the queue only absorbs
# a slow batch (large JPEGs, RandAugment's costlier ops) on one worker while the others go on, and workers x 2
# batches is already that many steps of slack. Each queued batch sits in shared memory (/dev/shm): at the paper's
# 128 images per rank and 224 px, 15 workers x 2 x 19 MB (uint8) = 0.6 GB per rank.
PREFETCH_FACTOR = 2


class Batch(NamedTuple):
    """What every loader yields. An image that cannot be decoded is dropped from its batch and counted in
    ``skipped`` rather than ending a multi-day run; workers are separate processes, so the count travels with the
    batch, and :class:`EpochLoader` keeps a running total the recipe can reduce over ranks."""

    images: torch.Tensor  # (n, C, H, W) uint8 with n <= the batch size: undecodable images are dropped
    labels: torch.Tensor  # (n,) int64
    skipped: int  # undecodable images dropped from this batch


class SkipCollate:
    """Stacks the decodable samples of a batch and counts the rest (a class, so spawned workers can pickle it)."""

    def __init__(self, image_shape: tuple[int, ...]) -> None:
        self.image_shape = image_shape

    def __call__(self, samples: list[tuple[torch.Tensor, int] | None]) -> Batch:
        good = [s for s in samples if s is not None]
        skipped = len(samples) - len(good)
        if not good:
            return Batch(torch.empty((0, *self.image_shape), dtype=torch.uint8), torch.empty(0, dtype=torch.int64),
                         skipped)
        return Batch(torch.stack([s[0] for s in good]), torch.tensor([s[1] for s in good], dtype=torch.int64),
                     skipped)


class EpochLoader:
    """A DataLoader kept for the whole run, so persistent workers outlive epochs; ``set_epoch`` re-aims it.

    Iterating yields :class:`Batch` es and adds their ``skipped`` to ``self.skipped`` (this rank's running
    total; reduce it over ranks to report). It also counts the images delivered and the seconds the consumer
    spent waiting for them, which :meth:`take_rate` turns into the input pipeline's rate. ``len()`` is the
    batches left in the epoch after ``start_batch``; for ``wds`` evaluation it is unknown and ``len()`` raises
    TypeError.
    """

    def __init__(self, loader: DataLoader, steps_per_epoch: int | None, on_epoch: Callable[[int, int], None]):
        self.loader = loader
        self.steps_per_epoch = steps_per_epoch
        self._on_epoch = on_epoch
        self.epoch = 0
        self.start_batch = 0
        self.skipped = 0
        self._delivered = 0
        self._waited = 0.0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Call before iterating; ``start_batch`` batches of ``epoch`` are skipped (a mid-epoch resume)."""
        steps = self.steps_per_epoch
        if start_batch < 0 or (steps is not None and start_batch > steps):
            raise DataError(f"cannot resume at batch {start_batch} of an epoch of {steps} batches per rank; "
                            "resume with the batch size and world size the checkpoint was written with")
        self.epoch, self.start_batch = epoch, start_batch
        self._on_epoch(epoch, start_batch)

    def __len__(self) -> int:
        if self.steps_per_epoch is None:
            raise TypeError("this rank's share of WebDataset shards has no known batch count")
        return self.steps_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[Batch]:
        t0 = time.perf_counter()
        for batch in self.loader:  # the time to the next batch is what the consumer waits for it
            self._waited += time.perf_counter() - t0
            self._delivered += len(batch.labels)
            self.skipped += batch.skipped
            yield batch
            t0 = time.perf_counter()

    def take_rate(self) -> float | None:
        """Images delivered per second of waiting for them since the last call (None if none came), then reset.

        How fast the input pipeline could feed the consumer: far above the training rate, the loader keeps up;
        near it, training waits on data.
        """
        n, waited = self._delivered, self._waited
        self._delivered, self._waited = 0, 0.0
        return n / max(waited, 1e-9) if n else None


def default_workers() -> int:
    """Loader processes per rank: its CPUs (:func:`cpus_per_rank`) but one, which the training process itself
    keeps busy (launching the device's work, collating), and at least one. Decoding and RandAugment cost ~10 ms
    an image on one core, so a GPU rank wants every CPU it may use: a fixed cap starves a fast device."""
    return max(1, cpus_per_rank() - 1)


def _dataloader(dataset: Dataset, ctx: DistContext, batch_size: int, workers: int, seed: int, *,
                sampler: Sampler | None = None, drop_last: bool = False) -> DataLoader:
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = dict(persistent_workers=True, prefetch_factor=PREFETCH_FACTOR)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=workers,
        collate_fn=SkipCollate(dataset.image_shape), pin_memory=ctx.device.type == "cuda",
        # Worker RNGs derive from this: distinct per rank, fixed per run (training samples seed their own).
        generator=torch.Generator().manual_seed(mix_seeds(seed, ctx.rank, 3)), **extra)


def _check_batch(batch_size: int, workers: int | None) -> int:
    if batch_size < 1:
        raise DataError(f"batch size per rank {batch_size} is not positive; raise the global batch size")
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise DataError(f"{workers} data-loader workers; use 0 (load in the training process) or more")
    return workers


def train_loader(dataset: FolderSplit | WdsSplit, ctx: DistContext, batch_size_per_rank: int, *,
                 workers: int | None = None, seed: int = 0, epoch: int = 0, start_batch: int = 0,
                 drop_last: bool = True, shuffle_buffer: int = 1000) -> EpochLoader:
    """This rank's training batches, reshuffled each epoch; keep the loader and call ``set_epoch`` per epoch.

    ``folder``: a per-rank slice of a (seed, epoch) permutation; ``drop_last=False`` keeps a final short batch
    (the same size on every rank). ``wds``: shards dealt to ranks and workers in a (seed, epoch) order, samples
    mixed in a ``shuffle_buffer`` of encoded samples; always ``samples // (world * batch)`` full batches per
    rank (``drop_last`` does not apply), and a resume needs the same worker count, reads the skipped part of
    the stream and decodes none of it.

    Training order is a pure function of (seed, epoch, world size, batch size; for ``wds`` also the worker
    count): ranks read disjoint parts, every rank yields the same number of batches (a rank running short would
    hang the others in the gradient all-reduce), and ``start_batch`` resumes mid-epoch without decoding what it
    skips.
    """
    workers = _check_batch(batch_size_per_rank, workers)
    if isinstance(dataset, (FolderSplit, SyntheticSplit)):
        sampler = RankSampler(len(dataset), ctx.rank, ctx.world, seed)
        steps = sampler.per_rank // batch_size_per_rank if drop_last else math.ceil(
            sampler.per_rank / batch_size_per_rank)
        if steps == 0:
            raise DataError(f"data.batch_size={batch_size_per_rank * ctx.world}: {len(dataset)} training images "
                            f"give {ctx.world} rank(s) no batch of {batch_size_per_rank}; the largest batch these "
                            f"images allow is {sampler.per_rank * ctx.world}, or use more images")
        loader = _dataloader(dataset, ctx, batch_size_per_rank, workers, seed, sampler=sampler, drop_last=drop_last)

        def on_epoch(e: int, k: int) -> None:
            sampler.set_epoch(e, k * batch_size_per_rank)
    elif isinstance(dataset, WdsSplit):
        if len(dataset.urls) < ctx.world:
            raise DataError(f"{len(dataset.urls)} training shards cannot give {ctx.world} ranks disjoint data; "
                            "write the split into at least as many shards as ranks")
        if shuffle_buffer < 1:
            raise DataError(f"shuffle buffer {shuffle_buffer} is not positive; use e.g. 1000 samples")
        samples = dataset.num_samples
        if samples is None:
            log.info("counting the samples of %d shards; give the split's sample count to skip this",
                     len(dataset.urls))
            samples = dataset.num_samples = count_wds_samples(dataset.urls)
        steps = samples // (ctx.world * batch_size_per_rank)
        if steps == 0:
            raise DataError(f"data.batch_size={batch_size_per_rank * ctx.world}: {samples} training samples give "
                            f"{ctx.world} rank(s) no batch of {batch_size_per_rank}; the largest batch these samples "
                            f"allow is {samples // ctx.world * ctx.world}, or use more samples")
        part = dataset.bind(WdsPlan(ctx.rank, ctx.world, max(1, workers), seed, True, batch_size_per_rank, steps,
                                     shuffle_buffer))
        loader = _dataloader(part, ctx, batch_size_per_rank, workers, seed)

        def on_epoch(e: int, k: int) -> None:
            part._ctl[0], part._ctl[1] = e, k
    else:
        raise TypeError(f"train_loader needs a split from open_split, not {type(dataset).__name__}")
    result = EpochLoader(loader, steps, on_epoch)
    result.set_epoch(epoch, start_batch)
    return result


def eval_loader(dataset: FolderSplit | WdsSplit, ctx: DistContext, batch_size_per_rank: int, *,
                workers: int | None = None) -> EpochLoader:
    """This rank's disjoint part of an evaluation split; over all ranks every image comes exactly once.

    Ranks may differ by one batch (or, for ``wds``, by shard sizes); evaluation runs no collective per batch,
    only the final reduction of sums, so that is safe. Nothing is padded in, so summed metrics reduced over
    ranks are exact.
    """
    workers = _check_batch(batch_size_per_rank, workers)
    if isinstance(dataset, (FolderSplit, SyntheticSplit)):
        sampler = BlockSampler(len(dataset), ctx.rank, ctx.world)
        loader = _dataloader(dataset, ctx, batch_size_per_rank, workers, 0, sampler=sampler)
        return EpochLoader(loader, math.ceil(len(sampler) / batch_size_per_rank), lambda e, k: None)
    if isinstance(dataset, WdsSplit):
        part = dataset.bind(WdsPlan(ctx.rank, ctx.world, max(1, workers), 0, False, batch_size_per_rank, 0, 1))
        return EpochLoader(_dataloader(part, ctx, batch_size_per_rank, workers, 0), None, lambda e, k: None)
    raise TypeError(f"eval_loader needs a split from open_split, not {type(dataset).__name__}")
