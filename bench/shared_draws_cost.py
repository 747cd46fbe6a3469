#!/usr/bin/env python
"""What drawing AWD-LSTM's dropout masks for the global batch costs a rank, against drawing them for its own columns.

Every rank draws each step's masks for the whole global batch from a generator keyed by the step (so any world
size trains the same run) and takes its columns; before, each rank drew masks for its own columns from its own
stream. The extra work is the locked-dropout masks of the other ranks' columns and re-seeding a generator: small
next to a step. Measured on the paper's PTB model (3 layers, 400/1150, vocabulary 10,000, BPTT 70) as forward +
backward of one rank's share at 2 ranks (10 of 20 columns) and at 8 ranks (3 of 20), in train mode, on CPU:

  own      the model draws its masks for its columns (``masks=None``), from the global generator
  shared   ``draw_masks`` for all 20 columns from a ``KeyedGenerator`` keyed by the step, then this rank's columns

The two run interleaved in rounds after warm-up; the cost is the median of the per-round ratios (slow drift in
the shared machine's load cancels), with the spread over rounds. The verdict fails when the median cost is above
``--budget`` or the spread leaves it undecided (the upper quartile of the ratios above the budget).

    python bench/shared_draws_cost.py [--rounds 9] [--steps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_line, markdown_table  # noqa: E402
from recipes.awd_lstm.model import AWDLSTM  # noqa: E402
from trainer.rng import KeyedGenerator  # noqa: E402

GLOBAL_BATCH, BPTT, VOCAB = 20, 70, 10000


def step_time(model: AWDLSTM, tokens: torch.Tensor, shared: KeyedGenerator | None, step: int) -> float:
    t0 = time.perf_counter()
    masks = None
    if shared is not None:
        masks = model.draw_masks(GLOBAL_BATCH, shared.at(step)).columns(slice(0, tokens.size(1)))
    out = model(tokens, None, masks)
    loss = model.decoder(out.output).float().logsumexp(-1).mean()
    loss.backward()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=0.02)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line(), f"threads {args.threads}", flush=True)

    torch.manual_seed(0)
    model = AWDLSTM(VOCAB, 400, 1150, 3).train()
    keyed = KeyedGenerator(141, torch.device("cpu"))
    rows, ok = [], True
    for columns in (10, 3):
        tokens = torch.randint(0, VOCAB, (BPTT, columns))
        ratios, own_s, shared_s = [], [], []
        step = 0
        for r in range(args.warmup + args.rounds):
            times = {}
            for name, gen in (("own", None), ("shared", keyed)):
                total = 0.0
                for _ in range(args.steps):
                    model.zero_grad(set_to_none=True)
                    total += step_time(model, tokens, gen, step)
                    step += 1
                times[name] = total / args.steps
            if r >= args.warmup:
                ratios.append(times["shared"] / times["own"])
                own_s.append(times["own"])
                shared_s.append(times["shared"])
        q1, med, q3 = statistics.quantiles(ratios, n=4)
        cost = med - 1
        passed = cost <= args.budget and q3 - 1 <= args.budget
        ok &= passed
        tokens = BPTT * columns
        rows.append([f"{columns} of {GLOBAL_BATCH}", tokens / statistics.median(own_s),
                     tokens / statistics.median(shared_s),
                     f"{cost:+.2%}", f"{q1 - 1:+.2%} .. {q3 - 1:+.2%}", len(ratios), "PASS" if passed else "FAIL"])
    print()
    print(markdown_table(["columns on this rank", "own masks tokens/s", "shared masks tokens/s",
                          "cost (median of round ratios)", "interquartile range", "rounds", "verdict"], rows))
    print(f"\nbudget: shared draws cost at most {args.budget:.0%} of a step: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
