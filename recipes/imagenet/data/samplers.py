"""Which samples each rank reads, in what order, and the seeds that make order and augmentation replayable:
the training and evaluation samplers and the seed mixing every stream derives from. It reads no image."""

from __future__ import annotations

from typing import Iterator, NamedTuple

import torch
from torch.utils.data import Sampler

from trainer.rng import mix_seeds


AUGMENT = 4  # the last mix_seeds part of augmentation seeds (0-3 seed the data order and the loader)


class SampleKey(NamedTuple):
    """What the training sampler hands the dataset: an index, and what seeds that sample's augmentation."""

    index: int
    seed: int
    epoch: int

    def augmentation_seed(self) -> int:
        return mix_seeds(self.seed, self.epoch, self.index, AUGMENT)


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
        g = torch.Generator().manual_seed(mix_seeds(self.seed, self.epoch))
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
