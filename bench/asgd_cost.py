#!/usr/bin/env python
"""What NT-ASGD's running average costs a training step, and what it holds per rank.

1. In one process: the recipe's AWD-LSTM training step (forward, backward, clip, SGD; real PTB tokens, one thread,
   batch 10 = the per-rank batch at 2 ranks) without averaging, against the same step followed by the averaging
   update that runs after every optimizer step once averaging starts. Budgeted on the largest average a rank can
   hold, the whole model (1 rank): at N ranks each rank updates a 1/N shard of it. Each round is a pair of steps
   back to back, a plain step and a step + update, which one first alternating by round: both see the same
   machine state, and a drift in the machine's load between pairs falls on neither side. A step on this machine
   varies by several percent from one to the next, so the verdict needs a few hundred pairs.
   The shards of a 2-rank average (rank 0 holds mostly the embedding, rank 1 the LSTM tail) are timed after the
   pairs, their update alone against the median plain step: reported, not budgeted (each is part of the whole).

     step ms            median of the plain steps
     step + update ms   median of the steps followed by the update
     update ms          median of the update alone (for the whole model: inside the step + update time)
     cost               per pair: (step + update) / (the pair's plain step) - 1; the median of the pairs. Shards:
                        update / step
     95% CI             distribution-free 95% confidence interval of that median (order statistics): the spread
                        the verdict uses; it narrows with more rounds
     IQR                interquartile range of the pairs' costs (the machine's step-to-step noise)
     budget             the upper end of the CI within the budget: PASS; a CI wider than the budget: INCONCLUSIVE
                        (too noisy to tell: more rounds or a quieter machine); else FAIL

2. Memory: each rank's averaged copy (``ShardedAverage.buffer``) against the parameters' size, at N = 1, 2, 4, 8
   ranks, read from the objects the trainer builds.
3. With ``--launch``: real 2-rank training runs, averaging from step 1 (``optim.t0=1``) against
   ``optim.averaging=none``, interleaved in rounds; tokens/s from the engine's logs (first window dropped), the
   ratio per round (medians of the two runs' windows) with its median and min .. max. Not budgeted: a few 2-rank
   runs on a shared machine cannot resolve 2%; part 1 is the measure.

    python bench/asgd_cost.py [--shape paper|small] [--rounds 240] [--budget 0.02] [--launch] [--launch-rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from harness.corpora import short_eval_data
from harness.paths import DATA_ROOT, cleanup, scratch_dir
from harness.reporting import header, judge, legend, markdown_table, pct, pct_range, progress, ratio_span, verdict
from harness.runs import PAPER, SMALL, overrides, run_training, shell_line
from harness.timing import median, median_ci, round_order
from trainer.distributed import DistContext
from trainer.nt_asgd.sharded_average import ShardedAverage
from trainer.registry import get_recipe

BATCH, BPTT = 10, 70


def build(shape: dict):
    spec = get_recipe("awd_ptb")
    cfg = spec.load_config([], overrides({"data.root": DATA_ROOT}, shape))
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    recipe = spec.factory(cfg, ctx)
    recipe.setup()
    torch.manual_seed(0)
    model = recipe.build_model().train()
    return recipe, model, cfg


def contexts(world: int) -> list[DistContext]:
    return [DistContext(r, world, r, torch.device("cpu")) for r in range(world)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["paper", "small"], default="paper")
    ap.add_argument("--rounds", type=int, default=240, help="measured pairs of steps")
    ap.add_argument("--shard-updates", type=int, default=20, help="timed updates of each 2-rank shard")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--budget", type=float, default=0.02, help="largest cost of the update per training step")
    ap.add_argument("--launch", action="store_true", help="also time real 2-rank runs with and without averaging")
    ap.add_argument("--launch-rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    shape = PAPER if args.shape == "paper" else SMALL
    header("torch.set_num_threads(1)", f"shape {args.shape}", f"batch {BATCH} bptt {BPTT}",
           f"{args.rounds} pairs after {args.warmup} warm-up")

    recipe, model, cfg = build(shape)
    nparams = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.wdecay)
    data = recipe.corpus.train[: (recipe.corpus.train.numel() // BATCH) * BATCH].view(BATCH, -1).t().contiguous()
    averages = {"1 rank": ShardedAverage(model, contexts(1)[0]),
                **{f"2 ranks, rank {c.rank}": ShardedAverage(model, c) for c in contexts(2)}}
    hidden = model.init_hidden(BATCH)
    pos = 0

    def train_step() -> float:
        nonlocal hidden, pos
        if pos + BPTT + 1 >= data.size(0):
            pos, hidden = 0, model.init_hidden(BATCH)
        inputs, targets = data[pos:pos + BPTT], data[pos + 1:pos + 1 + BPTT]
        pos += BPTT
        t0 = time.perf_counter()
        out = model(inputs, hidden)
        hidden = model.detach_hidden(out.hidden)
        loss, _ = model.loss(out, targets, cfg.model.alpha, cfg.model.beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip)
        opt.step()
        return time.perf_counter() - t0

    counts = {k: 0 for k in averages}

    def average_update(key: str) -> float:
        counts[key] += 1
        t0 = time.perf_counter()
        averages[key].update(1.0 / counts[key])
        return time.perf_counter() - t0

    whole, shard_keys = "1 rank", [k for k in averages if k != "1 rank"]
    plain, steps, updates = [], [], []
    for r in range(args.warmup + args.rounds):
        for averaged in ((False, True) if r % 2 == 0 else (True, False)):
            dt = train_step()
            du = average_update(whole) if averaged else 0.0
            if r >= args.warmup:
                (steps if averaged else plain).append(dt + du)
                if averaged:
                    updates.append(du)
        if r >= args.warmup and (r - args.warmup + 1) % 20 == 0:
            progress(f"round {r - args.warmup + 1}/{args.rounds}: plain step {1e3 * median(plain):.0f} ms")
    step_s = median(plain)

    costs = [a / b - 1 for a, b in zip(steps, plain)]
    lo, hi = median_ci(costs)
    q1, _, q3 = statistics.quantiles(costs, n=4)
    results = [judge(lo, hi, args.budget)]
    rows = [[whole, f"{averages[whole].buffer.numel():,}", 1e3 * step_s, 1e3 * median(steps), 1e3 * median(updates),
             pct(median(costs)), pct_range(lo, hi), pct_range(q1, q3), results[0]]]
    for key in shard_keys:
        alone = [average_update(key) for _ in range(args.shard_updates)]
        rows.append([key, f"{averages[key].buffer.numel():,}", 1e3 * step_s, "-", 1e3 * median(alone),
                     pct(median(alone) / step_s), "-", "-", "not budgeted"])

    mem_rows = []
    for world in (1, 2, 4, 8):
        shards = [ShardedAverage(model, c).buffer for c in contexts(world)]
        biggest = max(s.numel() * s.element_size() for s in shards)
        mem_rows.append([world, f"{nparams * 4 / 2**20:.1f}", f"{biggest / 2**20:.2f}",
                         f"{biggest / (nparams * 4):.4f}", f"{1 / world:.4f}",
                         "yes" if sum(s.numel() for s in shards) == nparams else "no"])

    launch_out = launched(args.launch_rounds, shape) if args.launch else None
    legend(__doc__)
    print(f"\n1. {nparams:,} parameters ({args.shape} shape)")
    print(markdown_table(["average", "values on this rank", "step ms", "step + update ms", "update ms", "cost (median)",
                          "cost, 95% CI of the median", "cost, IQR of pairs", "verdict"], rows))
    print("\n2. memory")
    print(markdown_table(["ranks N", "fp32 parameters MiB", "largest per-rank average MiB", "fraction", "1/N",
                          "shards cover the parameters exactly"], mem_rows))
    if launch_out:
        print("\n3. 2-rank runs")
        print(launch_out)
    return verdict(f"step + update against step, upper end of the 95% CI within {args.budget:.0%}", results)


def launched(rounds: int, shape: dict) -> str:
    """Part 3: its commands and tables, as text for the report."""
    root = scratch_dir("asgd-")
    data = short_eval_data()
    base = {"data.root": data, "data.verify": False, "data.download": False, "train.eval_every": 0,
            "train.checkpoint_every": 0, "train.test_at_end": False, "train.progress": False,
            "train.max_steps": 40 if shape is SMALL else 10, "train.log_every": 10 if shape is SMALL else 2}
    configs = {"optim.averaging=none": {"optim.averaging": "none"},
               "optim.averaging=nt_asgd optim.t0=1": {"optim.averaging": "nt_asgd", "optim.t0": 1}}
    rates: dict[str, list[list[float]]] = {k: [] for k in configs}
    lines = []
    try:
        for r in range(rounds):
            for label in round_order(list(configs), r):
                run = run_training(2, root / f"{r}-{configs[label]['optim.averaging']}",
                                   overrides(base, shape, configs[label]))
                windows = [m["tokens_per_s"] for m in run.metrics("train")][1:]  # the first window warms up
                rates[label].append(windows)
                if r == 0:
                    lines.append(shell_line(run.cmd))
                progress(f"round {r + 1} {label:36s} tokens/s " + " ".join(f"{t:.0f}" for t in windows))
                cleanup(run.run_dir)
    finally:
        cleanup(root)
        cleanup(data.parent)
    plain = [median(w) for w in rates["optim.averaging=none"]]
    rows = []
    for label, runs in rates.items():
        ratio = [median(w) / p for w, p in zip(runs, plain)]
        rows.append([label, sum(map(len, runs)), median(x for w in runs for x in w),
                     " ".join(f"{x:.3f}" for x in ratio), f"{median(ratio):.3f}", ratio_span(ratio)])
    return ("commands (round 1; the data is PTB with valid/test cut to 100 lines):\n"
            + "\n".join(f"  {line}" for line in lines) + "\n\n"
            + markdown_table(["2-rank run", "windows", "tokens/s (median)", "vs no averaging, per round",
                              "median", "min .. max"], rows))


if __name__ == "__main__":
    sys.exit(main())
