"""Opening a split of a dataset root by its format (``folder``, ``wds``): the one entry from a data config to a
dataset. Each format's own checks and layout are its module's; this chooses between them and nothing more."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from trainer.errors import DataError

from .folder import FolderSplit, open_folder
from .shards import WdsSplit, open_wds


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
        return open_folder(root, split, transform)
    if format == "wds":
        return open_wds(root, split, transform, shards, samples)
    raise DataError(f"unknown dataset format {format!r}; use 'folder' or 'wds'")

