#!/usr/bin/env python
"""One full epoch of awd_ptb at the small shape on real PTB: several seeds on 1 rank, and the first seed on 2 ranks.

The seeds show the spread an epoch's validation has from its seed alone (what any one-epoch comparison must beat);
their mean log-perplexity is the figure to compare. The same seed gives the same run whatever the world size to
float-summation order (every dropout mask is drawn for the global batch and each rank takes its columns): the
verdict fails when the 1- and 2-rank per-step training losses of the first seed differ by more than ``--budget``
(relative) over the first ``--agree-steps`` steps. Later the difference grows, as SGD at lr 30 amplifies rounding
(printed: where it passes 1e-3, and the end-of-epoch validation gap against the seeds' spread); masks drawn per
rank instead of for the global batch put it at 5e-4 from the first step. Also what an epoch costs on this machine.
No tuning: recipe defaults except the shape (emsize 200, nhid 400; batch 20, BPTT 70).

    python bench/awd_one_epoch.py [--seeds 1 2 3] [--ranks 1 2] [--budget 1e-5] [--agree-steps 20] [--keep]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

from harness.paths import DATA_ROOT, cleanup, scratch_dir
from harness.reporting import header, markdown_table, progress, verdict
from harness.runs import SMALL, overrides, shell_line, start_run
from harness.timing import median


def report_progress(run) -> None:
    rows = run.metrics("train")
    if rows:
        last = rows[-1]
        progress(f"  step {last['step']} epoch {last['epoch']:.2f} loss {last['loss']:.3f} "
                 f"tokens/s {last['tokens_per_s']:.0f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="run on 1 rank each")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="world sizes for the first seed")
    ap.add_argument("--budget", type=float, default=1e-5, help="largest relative gap in a step's training loss")
    ap.add_argument("--agree-steps", type=int, default=20, help="steps over which world sizes must agree")
    ap.add_argument("--poll", type=float, default=60.0, help="seconds between progress lines")
    ap.add_argument("--keep", action="store_true", help="keep the run directories (checkpoints, TensorBoard)")
    args = ap.parse_args()

    runs = [(seed, 1) for seed in args.seeds] + [(args.seeds[0], r) for r in args.ranks if r != 1]
    header("awd_ptb, small shape, one epoch", f"seeds {' '.join(map(str, args.seeds))} on 1 rank",
           f"seed {args.seeds[0]} on ranks {' and '.join(map(str, args.ranks))}")
    root = scratch_dir("epoch-")
    rows, loss, steps = [], {}, {}
    for seed, ranks in runs:
        sets = overrides({"data.root": DATA_ROOT, "seed": seed, "train.epochs": 1, "train.log_every": 1,
                          "train.test_at_end": False, "train.progress": False}, SMALL)
        run = start_run(ranks, root / f"seed{seed}-ranks{ranks}", sets)
        print(shell_line(run.cmd), flush=True)
        run.wait(poll_s=args.poll, report=report_progress)
        train, valid = run.metrics("train"), run.metrics("valid")
        rates = [r["tokens_per_s"] for r in train[1:]]  # first window holds warm-up
        v = valid[-1]
        loss[seed, ranks] = v["loss"]
        steps[seed, ranks] = [r["loss"] for r in train]
        rows.append([seed, ranks, v["step"], f"{v['ppl']:.1f}", f"{v['loss']:.4f}", run.wall_s, median(rates)])
    print()
    print(markdown_table(["seed", "ranks", "steps", "valid ppl", "valid log-ppl (loss)", "wall s",
                          "tokens/s (median)"], rows))
    one = [loss[seed, 1] for seed in args.seeds]
    mean = statistics.fmean(one)
    spread = f", spread (max - min) {max(one) - min(one):.4f}" if len(one) > 1 else ""
    print(f"\nmean valid log-perplexity over seeds {', '.join(map(str, args.seeds))} on 1 rank: {mean:.4f} "
          f"(ppl {math.exp(mean):.1f}){spread}")
    first, results = args.seeds[0], []
    for r in [r for r in args.ranks if r != 1]:
        gaps = [abs(b / a - 1) for a, b in zip(steps[first, 1], steps[first, r])]
        early = max(gaps[:args.agree_steps])
        apart = next((i + 1 for i, g in enumerate(gaps) if g > 1e-3), None)
        valid_gap = loss[first, r] - loss[first, 1]
        print(f"seed {first}, {r} ranks against 1: per-step training loss within {early:.1e} (relative) over steps "
              f"1-{args.agree_steps}; first step beyond 1e-3: {apart or 'none'}; end-of-epoch valid log-ppl "
              f"{valid_gap:+.4f} (the seeds' spread on 1 rank: {max(one) - min(one):.4f})")
        results.append("PASS" if early <= args.budget else "FAIL")
    if args.keep:
        print(f"run directories: {root}")
    else:
        cleanup(root)
    return verdict(f"seed {first}: per-step training losses of every world size within {args.budget:g} of 1 rank's "
                   f"over the first {args.agree_steps} steps", results)


if __name__ == "__main__":
    sys.exit(main())
