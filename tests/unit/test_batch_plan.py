"""How the global batch splits over ranks and micro-batches, and the loss weights that keep the gradient exact."""

import pytest
import torch

from trainer.batching import plan_batch
from trainer.errors import ConfigError


def _columns(plan_of):
    """Every rank's micro-batch column slices, in rank order."""
    return [s for r in range(plan_of(0).world) for s in plan_of(r).micro_slices()]


@pytest.mark.parametrize("batch, world, micro, shares, sizes0", [
    (20, 8, 0, (3, 3, 3, 3, 2, 2, 2, 2), (3,)),
    (20, 3, 0, (7, 7, 6), (7,)),
    (20, 3, 4, (7, 7, 6), (4, 3)),
    (20, 2, 5, (10, 10), (5, 5)),
    (20, 1, 0, (20,), (20,)),
])
def test_uneven_shares_tile_the_global_batch(batch, world, micro, shares, sizes0):
    plan_of = lambda r: plan_batch(batch, world, micro, r, uneven=True)  # noqa: E731
    assert plan_of(0).shares == shares and plan_of(0).micro_sizes() == sizes0
    cols = _columns(plan_of)
    assert [c.start for c in cols] == [0] + [c.stop for c in cols[:-1]] and cols[-1].stop == batch
    assert len({len(plan_of(r).micro_slices()) for r in range(world)}) == 1  # same accumulation on every rank
    assert plan_of(0).even == (len({c.stop - c.start for c in cols}) == 1)


def test_loss_weights_make_deepspeeds_average_the_global_mean():
    """DeepSpeed divides each backward by the accumulation count and averages over ranks; the weighted micro
    means then sum to the mean over all columns, for any split."""
    torch.manual_seed(0)
    per_column = torch.rand(20, dtype=torch.float64)
    for world, micro in [(1, 0), (2, 0), (3, 0), (3, 4), (8, 0), (8, 2), (6, 3)]:
        plan = plan_batch(20, world, micro, 0, uneven=True)
        total = sum(plan.loss_weight(c.stop - c.start) * per_column[c].mean()
                    for r in range(world) for c in plan_batch(20, world, micro, r, uneven=True).micro_slices())
        torch.testing.assert_close(total / (plan.accumulation * world), per_column.mean(), rtol=1e-12, atol=0)


def test_even_plans_weigh_every_micro_batch_one():
    plan = plan_batch(20, 2, 5, 1)
    assert plan.even and plan.micro == 5 and plan.accumulation == 2 and plan.loss_weight(5) == 1.0


@pytest.mark.parametrize("batch, world, micro, uneven, words", [
    (20, 8, 0, False, "does not divide over 8"),
    (4, 8, 0, True, "smaller than the 8"),
    (20, 8, 1, True, "only 2"),
    (20, 2, 3, False, "does not divide the per-rank batch 10"),
])
def test_impossible_splits_are_one_line_config_errors(batch, world, micro, uneven, words):
    with pytest.raises(ConfigError, match=words) as err:
        plan_batch(batch, world, micro, 0, uneven=uneven)
    assert "\n" not in str(err.value)
