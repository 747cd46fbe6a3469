"""Synthetic images: one pre-made random tensor of the right shape for every index, so a model's speed can be
measured apart from decoding. It reads no file and draws nothing per sample."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from trainer.errors import DataError

from .samplers import SampleKey


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
        # uint8, as the decoding splits give it: the recipe normalizes every batch on the device
        self._image = torch.randint(0, 256, self.image_shape, dtype=torch.uint8,
                                    generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor, int]:
        i = key.index if isinstance(key, SampleKey) else key
        return self._image, i % len(self.classes)

