"""WebDataset tar shards whose samples hold one image (``jpg``/``jpeg``/``png``/``webp``) and a ``cls`` integer
label: opening a split's shards, counting their samples, and streaming a rank's and worker's share of them in a
replayable order. It batches nothing (the loader does) and decodes no sample a resume skips."""

from __future__ import annotations

import copy
import hashlib
import io
import itertools
import logging
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from trainer.errors import DataError

from .decoding import Decoding
from .samplers import AUGMENT, mix_seeds
from .transforms import augment, probe_shape

log = logging.getLogger(__name__)

WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class WdsPlan:
    rank: int
    world: int
    workers: int  # DataLoader workers, at least 1 (the main process counts as one)
    seed: int
    train: bool
    batch_size: int
    batches: int  # per rank per epoch (train only)
    shuffle_buffer: int


class WdsSplit(Decoding, IterableDataset):
    """WebDataset shards. A loader iterates a bound copy that knows its rank and reads only its part.

    Shards are dealt to the world's (rank, worker) slots; with fewer shards than slots each rank takes whole
    shards and its workers take every n-th sample. Training streams cycle through their shards until they
    have produced exactly their batches, so every rank yields the same number of batches even when shard
    sizes differ; evaluation streams read their shards once.
    """

    def __init__(self, urls: list[str], transform: Callable, samples: int | None = None) -> None:
        self.urls = list(urls)
        self.transform = transform
        self.num_samples = samples
        self.classes: list[str] | None = None
        self.image_shape = probe_shape(transform)
        self._plan: WdsPlan | None = None
        self._ctl: torch.Tensor | None = None

    def bind(self, plan: WdsPlan) -> "WdsSplit":
        part = copy.copy(self)
        part._plan = plan
        # [epoch, start_batch] in shared memory: persistent workers hold their own copy of this object,
        # and this is how set_epoch reaches them.
        part._ctl = torch.zeros(2, dtype=torch.int64).share_memory_()
        return part

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int] | None]:
        plan = self._plan
        if plan is None:
            raise RuntimeError("iterate a WdsSplit through train_loader or eval_loader")
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, start_batch = (int(v) for v in self._ctl.tolist())
        if not plan.train:
            raw: Iterable[dict] = self._raw(worker, workers, epoch, cycle=False)
        else:
            # The DataLoader takes batch i from worker i % workers. A resumed loader's worker w plays the role
            # of the worker that made batch start_batch + w, so its round-robin continues the epoch's.
            role = (worker + start_batch) % workers
            done = _congruent_below(start_batch, role, workers)
            total = _congruent_below(plan.batches, role, workers)
            stream = self._raw(role, workers, epoch, cycle=True)
            raw = itertools.islice(stream, done * plan.batch_size, total * plan.batch_size)  # skipped: undecoded
        for sample in raw:
            yield self._decode(sample, self._augmentation_seed(sample, epoch) if plan.train else None)

    def _raw(self, role: int, workers: int, epoch: int, cycle: bool) -> Iterator[dict]:
        plan = self._plan
        order = list(range(len(self.urls)))
        if plan.train:
            random.Random(mix_seeds(plan.seed, epoch, 0)).shuffle(order)  # the same on every rank
        slots = plan.world * workers
        if len(order) >= slots:
            mine, keep = [self.urls[i] for i in order[plan.rank * workers + role::slots]], None
        else:
            mine, keep = [self.urls[i] for i in order[plan.rank::plan.world]], role
        from webdataset.tariterators import tarfile_samples

        for p in itertools.count() if cycle else range(1):
            if p > 0:
                random.Random(mix_seeds(plan.seed, epoch, plan.rank, role, 2, p)).shuffle(mine)
            n = 0
            samples: Iterable[dict] = tarfile_samples(iter([{"url": u} for u in mine]), handler=self._tar_error)
            if keep is not None:
                samples = itertools.islice(samples, keep, None, workers)
            if plan.train:
                # One buffer per pass, emptied at its end: a pass is finished before the next starts, so a
                # worker whose data fits its batches sees every sample once.
                rng = random.Random(mix_seeds(plan.seed, epoch, plan.rank, role, 1, p))
                samples = _buffer_shuffle(samples, plan.shuffle_buffer, rng)
            for sample in samples:
                n += 1
                sample["__pass__"] = p
                yield sample
            if n == 0 and cycle:
                raise DataError(f"rank {plan.rank} worker {role} found no samples in its shards "
                                f"({', '.join(mine[:2]) or 'none'}); check that the shards hold images")

    def _augmentation_seed(self, sample: dict, epoch: int) -> int:
        """From (seed, epoch, pass, shard file name, key): not from the worker, nor from where the shards live.

        The pass counts a training stream's cycles through its shards, so a sample read twice in an epoch is
        augmented twice, not replayed.
        """
        name = f"{os.path.basename(str(sample.get('__url__')))}/{sample.get('__key__')}"
        digest = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
        return mix_seeds(self._plan.seed, epoch, sample["__pass__"], digest, AUGMENT)

    def _tar_error(self, exn: Exception) -> bool:
        log.warning("skipping the rest of a damaged shard: %s", exn)
        return True

    def _decode(self, sample: dict, seed: int | None) -> tuple[torch.Tensor, int] | None:
        name = f"{sample.get('__url__')}:{sample.get('__key__')}"
        data = next((sample[k] for k in WDS_IMAGE_KEYS if k in sample), None)
        if data is None or "cls" not in sample:
            self._bad(name, "the sample needs an image (jpg/jpeg/png/webp) and a cls label")
            return None
        try:
            label = int(sample["cls"])
        except (TypeError, ValueError):
            self._bad(name, f"cls {sample['cls'][:20]!r} is not an integer")
            return None
        image = self._read_image(io.BytesIO(data), name)
        return None if image is None else (augment(self.transform, image, seed), label)


def _congruent_below(n: int, r: int, m: int) -> int:
    """How many j in [0, n) have j % m == r (0 <= r < m)."""
    return max(0, (n - r + m - 1) // m)


def _buffer_shuffle(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``size`` raw (still encoded) samples: memory ~ size x file size."""
    buf: list = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        k = rng.randrange(size)
        yield buf[k]
        buf[k] = x
    rng.shuffle(buf)
    yield from buf


def count_wds_samples(urls: Sequence[str]) -> int:
    """Samples with an image in local tar shards, from the tar headers alone (no image data is read)."""
    total = 0
    for url in urls:
        if _remote(url):
            raise DataError(f"cannot count the samples of remote shard {url}; set the split's sample count")
        keys = set()
        try:
            with tarfile.open(url, "r:*") as tar:
                for m in tar:
                    base, _, ext = m.name.rpartition("/")[2].partition(".")
                    if m.isreg() and ext.lower() in WDS_IMAGE_KEYS:
                        keys.add((m.name.rpartition("/")[0], base))
        except (OSError, tarfile.TarError) as e:
            raise DataError(f"cannot read shard {url} ({e}); rewrite it or remove it from the shard pattern") \
                from None
        total += len(keys)
    return total


def _remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def open_wds(root: Path, split: str, transform: Callable, shards: str | None, samples: int | None) -> WdsSplit:
    import braceexpand

    layout = f"expected {root}/{split}/*.tar or {root}/{split}-*.tar"
    if shards is None:
        if not root.is_dir():
            raise DataError(f"shard root {root} does not exist; {layout}")
        urls = sorted(str(p) for p in (root / split).glob("*.tar")) or sorted(map(str, root.glob(f"{split}-*.tar")))
        if not urls:
            raise DataError(f"no {split} shards under {root}; {layout}, "
                            f"or give a brace pattern like '{split}-{{000000..000127}}.tar'")
    else:
        urls = [u if _remote(u) or os.path.isabs(u) else str(root / u) for u in braceexpand.braceexpand(shards)]
        missing = [u for u in urls if not _remote(u) and not os.path.isfile(u)]
        if missing:
            raise DataError(f"{len(missing)} of {len(urls)} shards of {shards!r} are missing, e.g. {missing[0]}; "
                            "check the data root and the brace pattern")
    if samples is not None and samples < 1:
        raise DataError(f"sample count {samples} for the {split} shards is not positive; give the true count")
    return WdsSplit(urls, transform, samples)
