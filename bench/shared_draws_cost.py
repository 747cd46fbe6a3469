#!/usr/bin/env python
"""What drawing AWD-LSTM's dropout masks for the global batch costs a rank, against drawing them for its own columns.

Every rank draws each step's masks for the whole global batch from a generator keyed by the step (so any world
size trains the same run) and takes its columns; before, each rank drew masks for its own columns from its own
stream. The extra work is the locked-dropout masks of the other ranks' columns and re-seeding a generator. Measured
on the paper's PTB model (3 layers, 400/1150, vocabulary 10,000, BPTT 70) for one rank's share at 2 ranks (10 of 20
columns) and at 8 ranks (3 of 20), on CPU:

  step     forward + backward of the share in train mode (masks drawn inside, as a rank did before)
  own      drawing every mask of a step for the share's columns, from the global generator
  shared   drawing them for all 20 columns from a ``KeyedGenerator`` keyed by the step, and cutting the share out

The draws are far shorter than a step and much less noisy, so they are timed on their own, many times, and the cost
is (shared - own) / step, with its spread from the draws' interquartile ranges. The verdict fails when the upper end
of that spread is above ``--budget`` (INCONCLUSIVE when the spread is wider than the budget).

    python bench/shared_draws_cost.py [--steps 8] [--draws 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from harness.reporting import header, judge, legend, markdown_table, verdict
from recipes.awd_lstm.model import AWDLSTM
from trainer.rng import KeyedGenerator

GLOBAL_BATCH, BPTT, VOCAB = 20, 70, 10000


def timed(fn, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="training steps timed per share (after one warm-up)")
    ap.add_argument("--draws", type=int, default=200, help="mask draws timed per variant (after 20 warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=0.02)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    header(f"torch.set_num_threads({args.threads})", f"{args.steps} steps and {args.draws} draws per variant")

    torch.manual_seed(0)
    model = AWDLSTM(VOCAB, 400, 1150, 3).train()
    keyed = KeyedGenerator(141, torch.device("cpu"))
    global_gen = torch.default_generator
    rows, results = [], []
    for columns in (10, 3):
        tokens = torch.randint(0, VOCAB, (BPTT, columns))

        def step(_):
            model.zero_grad(set_to_none=True)
            out = model(tokens)
            model.decoder(out.output).logsumexp(-1).mean().backward()

        def own(_):
            model.draw_masks(columns, global_gen)

        def shared(i):
            model.draw_masks(GLOBAL_BATCH, keyed.at(i)).columns(slice(0, columns))

        step(0)
        steps = timed(step, args.steps)
        for fn in (own, shared):
            timed(fn, 20)
        own_t, shared_t = [], []
        for _ in range(4):  # alternating blocks, so drift in the machine's load falls on both
            own_t += timed(own, args.draws // 4)
            shared_t += timed(shared, args.draws // 4)
        step_s = statistics.median(steps)
        (o1, om, o3), (s1, sm, s3) = statistics.quantiles(own_t, n=4), statistics.quantiles(shared_t, n=4)
        cost, low, high = (sm - om) / step_s, (s1 - o3) / step_s, (s3 - o1) / step_s
        results.append(judge(low, high, args.budget))
        tokens_n = BPTT * columns
        rows.append([f"{columns} of {GLOBAL_BATCH}", step_s, tokens_n / step_s, tokens_n / (step_s + sm - om),
                     om * 1e3, sm * 1e3, f"{cost:+.3%}", f"{low:+.3%} .. {high:+.3%}", results[-1]])
    legend(__doc__)
    print()
    print(markdown_table(["columns on this rank", "step s (median)", "tokens/s, own masks", "tokens/s, shared masks",
                          "own draws ms (median)", "shared draws ms (median)", "cost", "cost spread (IQRs)",
                          "verdict"], rows))
    return verdict(f"shared draws cost at most {args.budget:.0%} of a step (upper end of the spread)", results)


if __name__ == "__main__":
    sys.exit(main())
