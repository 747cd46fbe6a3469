"""How a global batch is split over data-parallel ranks and accumulation steps, any world size alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import ConfigError

if TYPE_CHECKING:
    from .recipe import MicroResult


def even_shares(total: int, parts: int) -> tuple[int, ...]:
    """``total`` split into ``parts`` sizes that differ by at most one, the larger first."""
    base, extra = divmod(total, parts)
    return tuple(base + (i < extra) for i in range(parts))


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch is split over ranks and accumulation steps.

    ``shares[r]`` is rank ``r``'s part of the global batch; shares differ by at most one (the first
    ``global_batch % world`` ranks take one more) where the recipe allows uneven splits, so any world
    size trains the same global batch. Each rank cuts its share into ``accumulation`` contiguous
    micro-batches as evenly as possible, the largest ``micro`` long. A micro-batch's loss is weighted
    by its size (``loss_weight``) so the all-reduced gradient is exactly the global batch's.
    """

    global_batch: int
    world: int
    rank: int
    shares: tuple[int, ...]
    micro: int
    accumulation: int

    @property
    def per_rank(self) -> int:
        """This rank's share of the global batch."""
        return self.shares[self.rank]

    @property
    def offset(self) -> int:
        """This rank's first column (sample) of the global batch."""
        return sum(self.shares[:self.rank])

    @property
    def even(self) -> bool:
        """Every micro-batch of every rank has ``micro`` samples (the only split DeepSpeed's own batch
        arithmetic describes)."""
        return self.micro * self.accumulation * self.world == self.global_batch

    def micro_sizes(self, rank: int | None = None) -> tuple[int, ...]:
        return even_shares(self.shares[self.rank if rank is None else rank], self.accumulation)

    def micro_slices(self, rank: int | None = None) -> list[slice]:
        """Each micro-batch's columns within the global batch, in order (for rank ``rank``, default this one)."""
        rank = self.rank if rank is None else rank
        start = sum(self.shares[:rank])
        out = []
        for size in self.micro_sizes(rank):
            out.append(slice(start, start + size))
            start += size
        return out

    def loss_weight(self, size: int) -> float:
        """What a micro-batch's mean loss over ``size`` samples is multiplied by before backward, so DeepSpeed's
        averaging (over ``accumulation`` steps, then over ``world`` ranks) yields the global batch's mean."""
        return size * self.accumulation * self.world / self.global_batch

    def weighted_loss(self, result: "MicroResult") -> torch.Tensor:
        """What is back-propagated for ``result``: its loss, weighted by its size when it has one."""
        return result.loss if result.size is None else result.loss * self.loss_weight(result.size)


def plan_batch(global_batch: int, world: int, micro: int, rank: int = 0, uneven: bool = False) -> BatchPlan:
    """Split the global batch over ranks and accumulation steps (see ``BatchPlan``).

    ``micro`` (``train.micro_batch_size``, 0 = a rank's whole share) bounds a micro-batch; the accumulation
    count is what the largest share needs. A recipe that cannot train uneven shares gets exact division.
    """
    if global_batch < world:
        raise ConfigError(f"data.batch_size={global_batch} is smaller than the {world} data-parallel ranks; "
                          f"use a batch of at least {world} or fewer ranks")
    if global_batch % world and not uneven:
        raise ConfigError(
            f"data.batch_size={global_batch} does not divide over {world} data-parallel ranks; "
            f"use a multiple of {world}"
        )
    shares = even_shares(global_batch, world)
    largest = shares[0]
    micro = micro or largest
    if uneven:
        accumulation = -(-largest // micro)
        if shares[-1] < accumulation:
            raise ConfigError(
                f"train.micro_batch_size={micro} needs {accumulation} micro-batches per step, but a rank's share "
                f"of data.batch_size={global_batch} over {world} ranks is only {shares[-1]}; raise "
                "train.micro_batch_size or the batch")
        micro = -(-largest // accumulation)
    else:
        if largest % micro:
            raise ConfigError(
                f"train.micro_batch_size={micro} does not divide the per-rank batch {largest} "
                f"(data.batch_size={global_batch} over {world} ranks); pick a divisor of {largest}"
            )
        accumulation = largest // micro
    return BatchPlan(global_batch, world, rank, shares, micro, accumulation)
