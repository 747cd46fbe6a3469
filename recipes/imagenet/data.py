"""ImageNet input pipeline for the ViT / MLP-Mixer recipes: transforms, splits and per-rank loaders.

Two on-disk formats:

* ``folder``: ``root/train/<class>/<image>`` and ``root/val/<class>/<image>``; class index = position of the
  class directory in the sorted list of ``root/train``'s, so both splits agree.
* ``wds``: WebDataset tar shards whose samples hold one image (``jpg``/``jpeg``/``png``/``webp``) and a ``cls``
  integer label.

Every batch is a :class:`Batch` ``(images, labels, skipped)``. An image that cannot be decoded is dropped from
its batch and counted in ``skipped`` rather than ending a multi-day run; workers are separate processes, so the
count travels with the batch, and :class:`EpochLoader` keeps a running total the recipe can reduce over ranks.
Each worker names the first bad file it meets in a warning. Only decoding is guarded: an exception raised by
the transform itself is a bug and still propagates.

Training order is a pure function of (seed, epoch, world size, batch size; for ``wds`` also the worker count):
ranks read disjoint parts, every rank yields the same number of batches (a rank running short would hang the
others in the gradient all-reduce), and ``start_batch`` resumes mid-epoch without decoding what it skips.
Augmentation is replayed exactly too: before a training sample is transformed, python's, numpy's and torch's
CPU streams are seeded from (seed, epoch, the sample: its index for ``folder``; for ``wds`` its shard file name,
key and pass over the shards), so a sample's crop, flip, RandAugment and erasing do not depend on which worker
transforms it, how many workers there are, or whether the epoch was resumed. Seeding costs ~45 us a sample,
~0.5% of decoding and transforming a 500x375 JPEG to 224 px (~9 ms on one core); without workers, putting the
training process's own streams back adds ~0.2 ms. Evaluation samples are not seeded (their transform draws
nothing) and cover every image exactly once over all ranks, with no padding, so summed metrics reduced over
ranks are exact.
"""

from __future__ import annotations

import copy
import hashlib
import io
import itertools
import logging
import math
import os
import random
import struct
import tarfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from trainer.distributed import DistContext
from trainer.errors import DataError
from trainer.rng import preserved_host_rng, seed_host_rng

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "Batch", "EpochLoader", "FolderSplit", "SampleKey", "WdsSplit",
    "build_transforms", "count_wds_samples", "default_workers", "eval_loader", "open_split", "train_loader",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
PREFETCH_FACTOR = 4
# What PIL raises on truncated, corrupt or hostile files. Anything else is a bug and is not swallowed.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


class Batch(NamedTuple):
    images: torch.Tensor  # (n, C, H, W) with n <= the batch size: undecodable images are dropped
    labels: torch.Tensor  # (n,) int64
    skipped: int  # undecodable images dropped from this batch


def _mix(*parts: int) -> int:
    """One 63-bit seed from several ints, so (seed, epoch) pairs cannot collide the way ``seed + epoch`` does."""
    state = np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


_AUGMENT = 4  # the last _mix part of augmentation seeds (0-3 seed the data order and the loader)


class SampleKey(NamedTuple):
    """What the training sampler hands the dataset: an index, and what seeds that sample's augmentation."""

    index: int
    seed: int
    epoch: int

    def augmentation_seed(self) -> int:
        return _mix(self.seed, self.epoch, self.index, _AUGMENT)


def _augment(transform: Callable, image: Image.Image, seed: int | None) -> torch.Tensor:
    """``transform(image)``, its random draws seeded by ``seed`` when one is given (training samples).

    A loader worker's streams serve only its transforms; in the training process itself (no workers) they are
    also dropout's and mixup's, so they are put back afterwards.
    """
    if seed is None:
        return transform(image)
    with preserved_host_rng() if get_worker_info() is None else nullcontext():
        seed_host_rng(seed)
        return transform(image)


# ----------------------------------------------------------------------------------------------- transforms

def build_transforms(
    image_size: int,
    train: bool,
    *,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    reprob: float = 0.25,
    remode: str = "pixel",
    interpolation: str = "bicubic",
    crop_pct: float = 0.875,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    color_jitter: float | None = 0.4,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[Image.Image], torch.Tensor]:
    """DeiT-style timm transforms, PIL RGB image -> normalized (3, image_size, image_size) float tensor.

    Train: RandomResizedCrop(scale), horizontal flip, RandAugment (``auto_augment``; timm turns colour jitter
    off while it is on), random erasing with probability ``reprob``. Eval: resize the short side to
    ``floor(image_size / crop_pct)``, then centre-crop ``image_size``.
    """
    from timm.data import create_transform

    if image_size < 1:
        raise DataError(f"image size {image_size} is not positive; set the image size to e.g. 224")
    _patch_timm_posterize()
    try:
        if train:
            return create_transform(
                image_size, is_training=True, scale=tuple(scale), hflip=hflip, color_jitter=color_jitter,
                auto_augment=auto_augment or None, interpolation=interpolation, mean=tuple(mean), std=tuple(std),
                re_prob=reprob, re_mode=remode, re_count=1)
        return create_transform(image_size, is_training=False, interpolation=interpolation, crop_pct=crop_pct,
                                mean=tuple(mean), std=tuple(std))
    except (AssertionError, KeyError, ValueError) as e:
        raise DataError(f"bad augmentation settings (auto_augment={auto_augment!r}, interpolation="
                        f"{interpolation!r}, remode={remode!r}): {e or type(e).__name__}; use timm's spellings, "
                        "e.g. 'rand-m9-mstd0.5-inc1', 'bicubic', 'pixel'") from None


def _posterize_keeping_zero_bits(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize with Pillow >= 11's bits range: keeping 0 bits gives black, as Pillow used to.

    RandAugment 'inc1' at magnitude 10 (reached by m9 with mstd0.5 noise) asks for 0 bits; current Pillow
    rejects that with a ValueError, which would kill a loader worker mid-epoch.
    """
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1:
        return img.point(lambda _v: 0)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_timm_posterize() -> None:
    from timm.data import auto_augment

    for name, op in auto_augment.NAME_TO_OP.items():
        if getattr(op, "__name__", "") == "posterize":
            auto_augment.NAME_TO_OP[name] = _posterize_keeping_zero_bits


def _probe_shape(transform: Callable) -> tuple[int, ...]:
    """The transform's output shape, so that a batch of only bad images is still a well-formed empty tensor.

    The probe leaves every global random stream as it found it, so opening a split never shifts a seeded run.
    """
    with preserved_host_rng():
        out = transform(Image.new("RGB", (64, 64), (124, 116, 104)))
    if not isinstance(out, torch.Tensor):
        raise DataError(f"the image transform returned {type(out).__name__}, not a tensor; "
                        "build it with build_transforms")
    return tuple(out.shape)


# ----------------------------------------------------------------------------------------------- datasets

class _Decoding:
    """Decoding that turns a bad file into None and names the first one per process (i.e. per worker)."""

    _warned = False

    def _bad(self, name: str, why: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("skipping unreadable image %s (%s); later ones in this worker are counted, not named",
                        name, why)

    def _read_image(self, source: Any, name: str) -> Image.Image | None:
        try:
            with Image.open(source) as im:
                return im.convert("RGB")  # forces the full decode inside the guard
        except DECODE_ERRORS as e:
            self._bad(name, f"{type(e).__name__}: {e}")
            return None


class FolderSplit(_Decoding, Dataset):
    """One split of an ImageFolder tree; ``__getitem__`` gives ``(image, label)``, or None for a bad file.

    Paths live in one numpy byte array rather than a list of str: 1.28M Python objects would be copied into
    every forked worker page by page as reference counts touch them.
    """

    def __init__(self, split_dir: Path, classes: list[str], rel_paths: list[str], targets: list[int],
                 transform: Callable) -> None:
        self.root = split_dir
        self.classes = classes
        self._paths = np.array([p.encode() for p in rel_paths], dtype=bytes)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.transform = transform
        self.image_shape = _probe_shape(transform)

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, i: int) -> Path:
        return self.root / self._paths[i].decode()

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor, int] | None:
        """A plain index (evaluation) is transformed unseeded, a :class:`SampleKey` (training) seeded."""
        i, seed = (key.index, key.augmentation_seed()) if isinstance(key, SampleKey) else (key, None)
        path = self.path(i)
        image = self._read_image(path, str(path))
        return None if image is None else (_augment(self.transform, image, seed), int(self.targets[i]))


class SyntheticSplit(Dataset):
    """Random images of the right shape at no decoding cost, to measure a model apart from its input pipeline.

    Every index gives the same pre-made tensor (the loader still batches, collates and pins it), labels cycle
    over the classes, so the model sees an ordinary classification batch.
    """

    def __init__(self, size: int, image_size: int, num_classes: int) -> None:
        if size < 1 or num_classes < 1:
            raise DataError(f"synthetic data needs images and classes (got {size} and {num_classes}); "
                            "set data.train_size and model.num_classes")
        self.size = size
        self.classes = [f"class_{c}" for c in range(num_classes)]
        self.image_shape = (3, image_size, image_size)
        self._image = torch.randn(self.image_shape, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor, int]:
        i = key.index if isinstance(key, SampleKey) else key
        return self._image, i % len(self.classes)


@dataclass(frozen=True)
class _WdsPlan:
    rank: int
    world: int
    workers: int  # DataLoader workers, at least 1 (the main process counts as one)
    seed: int
    train: bool
    batch_size: int
    batches: int  # per rank per epoch (train only)
    shuffle_buffer: int


class WdsSplit(_Decoding, IterableDataset):
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
        self.image_shape = _probe_shape(transform)
        self._plan: _WdsPlan | None = None
        self._ctl: torch.Tensor | None = None

    def bind(self, plan: _WdsPlan) -> "WdsSplit":
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
            random.Random(_mix(plan.seed, epoch, 0)).shuffle(order)  # the same on every rank
        slots = plan.world * workers
        if len(order) >= slots:
            mine, keep = [self.urls[i] for i in order[plan.rank * workers + role::slots]], None
        else:
            mine, keep = [self.urls[i] for i in order[plan.rank::plan.world]], role
        from webdataset.tariterators import tarfile_samples

        for p in itertools.count() if cycle else range(1):
            if p > 0:
                random.Random(_mix(plan.seed, epoch, plan.rank, role, 2, p)).shuffle(mine)
            n = 0
            samples: Iterable[dict] = tarfile_samples(iter([{"url": u} for u in mine]), handler=self._tar_error)
            if keep is not None:
                samples = itertools.islice(samples, keep, None, workers)
            if plan.train:
                # One buffer per pass, emptied at its end: a pass is finished before the next starts, so a
                # worker whose data fits its batches sees every sample once.
                rng = random.Random(_mix(plan.seed, epoch, plan.rank, role, 1, p))
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
        return _mix(self._plan.seed, epoch, sample["__pass__"], digest, _AUGMENT)

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
        return None if image is None else (_augment(self.transform, image, seed), label)


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


# ----------------------------------------------------------------------------------------------- opening

def _class_dirs(d: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))


def _open_folder(root: Path, split: str, transform: Callable) -> FolderSplit:
    layout = f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image>"
    if not root.is_dir():
        raise DataError(f"ImageNet root {root} does not exist; {layout}")
    split_dir, train_dir = root / split, root / "train"
    if not split_dir.is_dir():
        raise DataError(f"no {split} split at {split_dir}; {layout}")
    if not train_dir.is_dir():
        raise DataError(f"no train split at {train_dir}, which defines the class indices; {layout}")
    classes = _class_dirs(train_dir)
    if not classes:
        raise DataError(f"{train_dir} has no class directories; expected {train_dir}/<class>/<image>")
    present = classes if split_dir == train_dir else _class_dirs(split_dir)
    if not present:
        raise DataError(f"{split_dir} has no class directories; expected {split_dir}/<class>/<image> "
                        "(sort a flat ImageNet val folder into class folders first)")
    extra = sorted(set(present) - set(classes))
    if extra:
        more = " ..." if len(extra) > 3 else ""
        raise DataError(f"{split_dir} has {len(extra)} class directories that {train_dir} lacks "
                        f"({', '.join(extra[:3])}{more}); both splits must use the same class names")
    index = {c: i for i, c in enumerate(classes)}
    paths: list[str] = []
    targets: list[int] = []
    empty: list[str] = []
    for c in present:
        files = sorted(e.name for e in os.scandir(split_dir / c)
                       if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file())
        if not files:
            empty.append(c)
        paths += [f"{c}/{f}" for f in files]
        targets += [index[c]] * len(files)
    if not paths:
        raise DataError(f"no images under {split_dir}; expected {split_dir}/<class>/<image> with one of the "
                        f"extensions {' '.join(IMAGE_EXTENSIONS)}")
    if empty:
        log.warning("%d class directories under %s hold no images (e.g. %s)", len(empty), split_dir, empty[0])
    return FolderSplit(split_dir, classes, paths, targets, transform)


def _remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def _open_wds(root: Path, split: str, transform: Callable, shards: str | None, samples: int | None) -> WdsSplit:
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


def open_split(root: str | os.PathLike, split: str, transform: Callable[[Image.Image], torch.Tensor], *,
               format: str = "folder", shards: str | None = None, samples: int | None = None
               ) -> FolderSplit | WdsSplit:
    """Open ``split`` ("train", "val", ...) of the dataset at ``root``.

    ``folder``: ``root/<split>/<class>/<image>``, class index from the sorted class directories of
    ``root/train``. ``wds``: ``shards`` is a brace pattern relative to ``root`` (default: ``root/<split>/*.tar``
    or ``root/<split>-*.tar``); ``samples`` is the split's size, which fixes the training batches per epoch
    (counted from the tar headers when omitted, which reads every header of every shard).
    """
    root = Path(root).expanduser()
    if format == "folder":
        return _open_folder(root, split, transform)
    if format == "wds":
        return _open_wds(root, split, transform, shards, samples)
    raise DataError(f"unknown dataset format {format!r}; use 'folder' or 'wds'")


# ----------------------------------------------------------------------------------------------- loading

class SkipCollate:
    """Stacks the decodable samples of a batch and counts the rest (a class, so spawned workers can pickle it)."""

    def __init__(self, image_shape: tuple[int, ...]) -> None:
        self.image_shape = image_shape

    def __call__(self, samples: list[tuple[torch.Tensor, int] | None]) -> Batch:
        good = [s for s in samples if s is not None]
        skipped = len(samples) - len(good)
        if not good:
            return Batch(torch.empty((0, *self.image_shape)), torch.empty(0, dtype=torch.int64), skipped)
        return Batch(torch.stack([s[0] for s in good]), torch.tensor([s[1] for s in good], dtype=torch.int64),
                     skipped)


class RankSampler(Sampler[SampleKey]):
    """This rank's share of a seeded permutation of the split, a new permutation each epoch.

    The last ``size % world`` indices of each permutation are left out (different ones each epoch) so all
    ranks get the same count without padding. Resuming slices the index list; nothing is loaded to skip.
    Iterating yields :class:`SampleKey` s, which seed each sample's augmentation.
    """

    def __init__(self, size: int, rank: int, world: int, seed: int) -> None:
        self.size, self.rank, self.world, self.seed = size, rank, world, seed
        self.per_rank = size // world
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def indices(self) -> list[int]:
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        perm = torch.randperm(self.size, generator=g)[:self.per_rank * self.world]
        return perm[self.rank::self.world][self.skip:].tolist()

    def __iter__(self) -> Iterator[SampleKey]:
        return (SampleKey(i, self.seed, self.epoch) for i in self.indices())

    def __len__(self) -> int:
        return max(0, self.per_rank - self.skip)


class BlockSampler(Sampler[int]):
    """Rank r's contiguous block of the split: the blocks tile it, so no image is padded in or left out."""

    def __init__(self, size: int, rank: int, world: int) -> None:
        self.start, self.stop = size * rank // world, size * (rank + 1) // world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


class EpochLoader:
    """A DataLoader kept for the whole run, so persistent workers outlive epochs; ``set_epoch`` re-aims it.

    Iterating yields :class:`Batch` es and adds their ``skipped`` to ``self.skipped`` (this rank's running
    total; reduce it over ranks to report). ``len()`` is the batches left in the epoch after ``start_batch``;
    for ``wds`` evaluation it is unknown and ``len()`` raises TypeError.
    """

    def __init__(self, loader: DataLoader, steps_per_epoch: int | None, on_epoch: Callable[[int, int], None]):
        self.loader = loader
        self.steps_per_epoch = steps_per_epoch
        self._on_epoch = on_epoch
        self.epoch = 0
        self.start_batch = 0
        self.skipped = 0

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
        for batch in self.loader:
            self.skipped += batch.skipped
            yield batch


def default_workers() -> int:
    """Split the host's cores between its ranks, at most 8 per rank (enough to keep a GPU fed at ViT sizes)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    return min(8, (os.cpu_count() or 1) // max(1, local))


def _dataloader(dataset: Dataset, ctx: DistContext, batch_size: int, workers: int, seed: int, *,
                sampler: Sampler | None = None, drop_last: bool = False) -> DataLoader:
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = dict(persistent_workers=True, prefetch_factor=PREFETCH_FACTOR)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=workers,
        collate_fn=SkipCollate(dataset.image_shape), pin_memory=ctx.device.type == "cuda",
        # Worker RNGs derive from this: distinct per rank, fixed per run (training samples seed their own).
        generator=torch.Generator().manual_seed(_mix(seed, ctx.rank, 3)), **extra)


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
    """
    workers = _check_batch(batch_size_per_rank, workers)
    if isinstance(dataset, (FolderSplit, SyntheticSplit)):
        sampler = RankSampler(len(dataset), ctx.rank, ctx.world, seed)
        steps = sampler.per_rank // batch_size_per_rank if drop_last else math.ceil(
            sampler.per_rank / batch_size_per_rank)
        if steps == 0:
            raise DataError(f"{len(dataset)} training images give {ctx.world} ranks no batch of "
                            f"{batch_size_per_rank}; lower the batch size or use more images")
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
            raise DataError(f"{samples} training samples give {ctx.world} ranks no batch of "
                            f"{batch_size_per_rank}; lower the batch size or use more samples")
        part = dataset.bind(_WdsPlan(ctx.rank, ctx.world, max(1, workers), seed, True, batch_size_per_rank, steps,
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
    only the final reduction of sums, so that is safe.
    """
    workers = _check_batch(batch_size_per_rank, workers)
    if isinstance(dataset, (FolderSplit, SyntheticSplit)):
        sampler = BlockSampler(len(dataset), ctx.rank, ctx.world)
        loader = _dataloader(dataset, ctx, batch_size_per_rank, workers, 0, sampler=sampler)
        return EpochLoader(loader, math.ceil(len(sampler) / batch_size_per_rank), lambda e, k: None)
    if isinstance(dataset, WdsSplit):
        part = dataset.bind(_WdsPlan(ctx.rank, ctx.world, max(1, workers), 0, False, batch_size_per_rank, 0, 1))
        return EpochLoader(_dataloader(part, ctx, batch_size_per_rank, workers, 0), None, lambda e, k: None)
    raise TypeError(f"eval_loader needs a split from open_split, not {type(dataset).__name__}")
