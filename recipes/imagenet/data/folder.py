"""ImageFolder trees, ``root/train/<class>/<image>`` and ``root/val/<class>/<image>``: opening a split (class
index = position of the class directory in the sorted list of ``root/train``'s, so both splits agree) and reading
its images. It decides no order or seed: the loader's sampler hands it indices or keys."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from trainer.errors import DataError

from .decoding import Decoding
from .samplers import SampleKey
from .transforms import augment, probe_shape

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class FolderSplit(Decoding, Dataset):
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
        self.image_shape = probe_shape(transform)

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, i: int) -> Path:
        return self.root / self._paths[i].decode()

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor, int] | None:
        """A plain index (evaluation) is transformed unseeded, a :class:`SampleKey` (training) seeded."""
        i, seed = (key.index, key.augmentation_seed()) if isinstance(key, SampleKey) else (key, None)
        path = self.path(i)
        image = self._read_image(path, str(path))
        return None if image is None else (augment(self.transform, image, seed), int(self.targets[i]))


def _class_dirs(d: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))


def open_folder(root: Path, split: str, transform: Callable) -> FolderSplit:
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
