"""Run under 1 or 2 ranks: NT-ASGD on a real DeepSpeed engine at ZeRO 0, 1 and 2, checked against the test's own mean.

Writes one JSON file (rank 0) with what every rank saw; tests/e2e/test_nt_asgd.py asserts on it.
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from trainer.nt_asgd.averager import NTASGD
from trainer.startup import init_distributed

T0, STEPS = 3, 8


def flat(module):
    return torch.cat([p.detach().float().reshape(-1) for p in module.parameters()]).clone()


def main(out_path):
    ctx = init_distributed()
    report = {"world": ctx.world, "stages": {}}
    for stage in (0, 1, 2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5))  # 174 params: shards cut mid-tensor
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config={
            "train_batch_size": 4 * ctx.world, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.0,
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})
        asgd = NTASGD(engine.module, ctx, t0=T0)
        gen = torch.Generator().manual_seed(100 + ctx.rank)  # ranks see different data
        iterates = []
        for step in range(1, STEPS + 1):
            x, y = torch.randn(4, 7, generator=gen), torch.randn(4, 5, generator=gen)
            engine.backward(nn.functional.mse_loss(engine(x), y))
            engine.step()
            asgd.after_step(step)
            iterates.append(flat(engine.module))
        expected = torch.stack(iterates[T0 - 1:]).mean(0)
        with asgd.swapped():
            inside = flat(engine.module)
        after = flat(engine.module)
        state = asgd.state_dict()
        fresh = NTASGD(engine.module, ctx)
        fresh.load_state_dict(state)
        with fresh.swapped():
            reloaded = flat(engine.module)
        report["stages"][stage] = {
            "max_err": (inside - expected).abs().max().item(),
            "raw_restored": torch.equal(after, iterates[-1]),
            "saved_err": (state["average"] - expected).abs().max().item(),
            "reloaded_err": (reloaded - expected).abs().max().item(),
            "count": asgd.count,
            "shard_numel": asgd.average.buffer.numel(),
            "total": asgd.average.total,
        }
    # the trigger decides on the mean over ranks: rank 0 alone would fire at the 4th check, the mean at the 5th
    trig = NTASGD(engine.module, ctx, nonmono=1)
    local = [[5.0, 4.0, 3.0, 4.5, 3.2], [5.0, 4.0, 3.0, 1.5, 3.2]][ctx.rank % 2] if ctx.world > 1 else [5.0, 4.0, 3.0, 3.0, 3.2]
    events = [trig.observe(loss, step=10 * (i + 1)) for i, loss in enumerate(local)]
    report["trigger"] = {"events": events, "start_step": trig.start_step}
    gathered = [None] * ctx.world
    dist.all_gather_object(gathered, report)
    if ctx.rank == 0:
        Path(out_path).write_text(json.dumps(gathered))


if __name__ == "__main__":
    main(sys.argv[-1])  # the deepspeed launcher puts --local_rank first
