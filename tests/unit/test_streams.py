"""trainer.streams.ShuffledTensors, the ready stream for in-memory tensors: one order for every world size, a
position that resumes mid-epoch, a batch larger than the data refused in one line."""

import pytest
import torch

from trainer.batching import plan_batch
from trainer.errors import ConfigError
from trainer.streams import ShuffledTensors

N, BATCH = 40, 8
X, Y = torch.arange(N, dtype=torch.float32).unsqueeze(1), torch.arange(N)


def epoch(world: int, rank: int, micro: int = 0, position: int | None = None, e: int = 1) -> list[torch.Tensor]:
    stream = ShuffledTensors(plan_batch(BATCH, world, micro, rank), X, Y, seed=3)
    stream.load_state_dict({"position": position})
    return [torch.cat([m.inputs for m in ts.micro_batches]) for ts in stream.steps(e)]


def test_every_world_size_and_micro_batch_visits_the_same_examples_per_step():
    one = epoch(1, 0)
    assert len(one) == N // BATCH and sorted(torch.cat(one).flatten().tolist()) == list(range(N))
    two = [torch.cat(pair) for pair in zip(epoch(2, 0), epoch(2, 1))]
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    assert all(torch.equal(a, b) for a, b in zip(one, epoch(1, 0, micro=2)))
    assert not torch.equal(torch.cat(one), torch.cat(epoch(1, 0, e=2)))  # each epoch its own order


def test_a_saved_position_resumes_where_the_epoch_was():
    stream = ShuffledTensors(plan_batch(BATCH, 1, 0, 0), X, Y, seed=3)
    steps = stream.steps(1)
    next(steps), next(steps)
    assert stream.state_dict() == {"position": 2}
    assert all(torch.equal(a, b) for a, b in zip(epoch(1, 0, position=2), epoch(1, 0)[2:]))
    list(steps)
    assert stream.state_dict() == {"position": None}  # the epoch ended: the next starts at its beginning


def test_a_batch_larger_than_the_data_is_refused_naming_the_largest():
    with pytest.raises(ConfigError, match=r"data.batch_size=64 is larger than the 40 training examples; use at most 40"):
        ShuffledTensors(plan_batch(64, 1, 0, 0), X, Y, seed=3)
