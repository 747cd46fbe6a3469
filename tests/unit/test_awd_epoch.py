"""An AWD-LSTM epoch steps as the reference's main.py does: each step's BPTT length is drawn, the step's learning
rate is scaled by that drawn length, and only then is the batch cut to the rows left in the epoch; no length is
capped. The steps are checked against the reference's loop, written out here, on a small corpus on 1 and 2 ranks."""

import pytest
import torch

from recipes.awd_lstm.corpus import BpttSampler
from trainer.distributed import DistContext
from trainer.batching import plan_batch
from trainer.registry import get_recipe

BPTT, BATCH, SEED = 20, 4, 7


def reference_epoch(rows: int, bptt: int, seed: int) -> list[tuple[int, float, int]]:
    """main.py's train(): (rows fed, learning-rate scale, position after) per step, for a stream of ``rows``."""
    sampler, i, steps = BpttSampler(bptt, seed), 0, []
    while i < rows - 1 - 1:
        seq_len = sampler.next_len()
        lr_scale = seq_len / bptt  # optimizer.param_groups[0]['lr'] = lr2 * seq_len / args.bptt
        fed = min(seq_len, rows - 1 - i)  # get_batch: seq_len = min(seq_len, len(source) - 1 - i)
        i += seq_len
        steps.append((fed, lr_scale, i))
    return steps


@pytest.mark.parametrize("world", [1, 2])
def test_an_epoch_has_the_reference_lengths_and_rates_to_its_last_step(ptb_slice, world):
    spec = get_recipe("awd_ptb")
    cfg = spec.load_config([], [f"data.root={ptb_slice.parent}", "data.verify=false", "data.download=false",
                                f"data.bptt={BPTT}", f"data.batch_size={BATCH}", f"seed={SEED}"])
    for rank in range(world):
        recipe = spec.factory(cfg, DistContext(rank, world, rank, torch.device("cpu")))
        recipe.setup()
        stream = recipe.train_data(plan_batch(BATCH, world, 0, rank, uneven=True))
        rows = stream.data.size(0)
        steps = [(ts.micro_batches[0].inputs.size(0), ts.lr_scale, ts.position) for ts in stream.steps(0)]
        want = reference_epoch(rows, BPTT, SEED)
        assert steps == want
        fed, scale, _ = steps[-1]
        assert fed < scale * BPTT  # the last batch was cut, its rate was not: the drawn length's
        assert fed < BPTT - 5  # this corpus ends on a short remainder: the two rules differ by a lot here
