#!/usr/bin/env python
"""What NT-ASGD's running average costs per training step, and what it holds per rank.

1. In one process, interleaved: the recipe's AWD-LSTM training step (forward, backward, clip, SGD;
   real PTB tokens, one thread, batch 10 = the per-rank batch at 2 ranks) with and without the
   averaging update that follows every optimizer step once averaging runs. Both rank shards of a
   2-rank average are timed (rank 0 holds mostly the embedding, rank 1 the LSTM tail), and the
   1-rank (whole) average. Ratios are medians of per-round ratios, so load drift cancels.
2. Memory: each rank's averaged copy (``ShardedAverage.buffer``) against the parameters' size, at
   N = 1, 2, 4, 8 ranks, read from the objects the trainer builds.
3. With ``--launch``: real 2-rank training runs, averaging from step 1 (``optim.t0=1``) against
   ``optim.averaging=none``, interleaved; tokens/s from the engine's logs.

    python bench/asgd_cost.py [--shape paper|small] [--rounds 12] [--launch]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (DATA_ROOT, PAPER, SMALL, cleanup, machine_line, markdown_table, median,  # noqa: E402
                          overrides, run_training, scratch_dir, short_eval_data)
from trainer.distributed import DistContext  # noqa: E402
from trainer.optim.sharded_average import ShardedAverage  # noqa: E402
from trainer.registry import get_recipe  # noqa: E402

BATCH, BPTT = 10, 70


def build(shape: dict):
    spec = get_recipe("awd_ptb")
    cfg = spec.load_config([], overrides({"data.root": DATA_ROOT}, shape))
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    recipe = spec.factory(cfg, ctx, None)
    recipe.setup()
    torch.manual_seed(0)
    model = recipe.build_model().train()
    return recipe, model, cfg


def contexts(world: int) -> list[DistContext]:
    return [DistContext(r, world, r, torch.device("cpu")) for r in range(world)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["paper", "small"], default="paper")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--launch", action="store_true", help="also time real 2-rank runs with and without averaging")
    ap.add_argument("--launch-rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    shape = PAPER if args.shape == "paper" else SMALL
    print(machine_line(), f"| torch.set_num_threads(1) | shape {args.shape} | batch {BATCH} bptt {BPTT}", flush=True)

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

    variants = ["plain", *averages]
    steps: dict[str, list[float]] = {v: [] for v in variants}
    updates: dict[str, list[float]] = {k: [] for k in averages}
    for r in range(args.warmup + args.rounds):
        for v in variants:
            dt = train_step()
            if v != "plain":
                du = average_update(v)
                dt += du
                if r >= args.warmup:
                    updates[v].append(du)
            if r >= args.warmup:
                steps[v].append(dt)

    rows = []
    for key in averages:
        ratio = median(a / b for a, b in zip(steps[key], steps["plain"]))
        share = median(u / s for u, s in zip(updates[key], steps["plain"]))
        rows.append([key, f"{averages[key].buffer.numel():,}", 1e3 * median(steps["plain"]),
                     1e3 * median(steps[key]), 1e3 * median(updates[key]), ratio, share])
    print()
    print(f"{nparams:,} parameters ({args.shape} shape); {args.rounds} rounds after {args.warmup} warm-up")
    print(markdown_table(["average", "values on this rank", "step ms (no averaging)", "step + update ms",
                          "update ms", "step+update / step", "update / step"], rows))

    mem_rows = []
    for world in (1, 2, 4, 8):
        shards = [ShardedAverage(model, c).buffer for c in contexts(world)]
        biggest = max(s.numel() * s.element_size() for s in shards)
        mem_rows.append([world, f"{nparams * 4 / 2**20:.1f}", f"{biggest / 2**20:.2f}",
                         f"{biggest / (nparams * 4):.4f}", f"{1 / world:.4f}",
                         sum(s.numel() for s in shards) == nparams])
    print()
    print(markdown_table(["ranks N", "fp32 parameters MiB", "largest per-rank average MiB", "fraction", "1/N",
                          "shards cover the parameters exactly"], mem_rows))

    if args.launch:
        launched(args.launch_rounds, shape)
    # The verdict uses the update's own time over the plain step's, both timed in the same rounds: the
    # step+update/step ratio says the same thing but carries the step's own round-to-round noise (~2%).
    worst = max(r[6] for r in rows)
    print(f"\n{'PASS' if worst < 0.02 else 'FAIL'}: the averaging update costs at most {100 * worst:.2f}% "
          "of a training step (budget 2%)")
    return 0


def launched(rounds: int, shape: dict) -> None:
    root = scratch_dir("asgd-")
    try:
        data = short_eval_data()
        base = {"data.root": data, "data.verify": False, "data.download": False, "train.eval_every": 0,
                "train.checkpoint_every": 0, "train.test_at_end": False, "train.progress": False,
                "train.max_steps": 40 if shape is SMALL else 10, "train.log_every": 10 if shape is SMALL else 2}
        configs = {"none": {"optim.averaging": "none"}, "nt_asgd t0=1": {"optim.averaging": "nt_asgd", "optim.t0": 1}}
        rates: dict[str, list[float]] = {k: [] for k in configs}
        for r in range(rounds):
            for label, extra in configs.items():
                run = run_training(2, root / f"{label.split()[0]}-{r}", overrides(base, shape, extra))
                windows = [m["tokens_per_s"] for m in run.metrics("train")][1:]  # the first window warms up
                rates[label].extend(windows)
                print(f"round {r + 1} {label:14s} tokens/s " + " ".join(f"{t:.0f}" for t in windows), flush=True)
        plain = median(rates["none"])
        print()
        print(markdown_table(["2-rank run", "windows", "tokens/s (median)", "vs no averaging"],
                             [[k, len(v), median(v), median(v) / plain] for k, v in rates.items()]))
    finally:
        cleanup(root)


if __name__ == "__main__":
    sys.exit(main())
