#!/usr/bin/env python
"""Training throughput of awd_ptb through the real engine: {paper, small shape} x {1, 2 ranks}.

Runs are short and interleaved (round r: every config once; odd rounds in reverse order) so drift
in the shared machine's load hits every config alike. Each run's first logged window (start-up,
allocator warm-up) is dropped. The data is real PTB train.txt with valid/test cut to 100 lines (same
vocabulary, checked), so the end-of-run validation does not outlast the training being timed.

  1 rank              one process; the engine gives a lone CPU rank every core as torch threads
  2 ranks             deepspeed launcher, each rank half the batch and cores / 2 threads
  1 rank, 1 thread    OMP_NUM_THREADS=1: separates the gain from data parallelism from the cost of
                      the engine's default of giving a lone CPU rank every core
  windows             logged windows kept, pooled over rounds
  tokens/s            the engine's own ``tokens_per_s`` (global, training time only), median of windows
  ms/step             wall time between consecutive train log lines / log_every, median of windows
  vs 1 rank           per round: this config's median window / 1 rank's of the same round; the median
                      of the rounds and min .. max over them
No budget: this benchmark reports, it does not judge.

    python bench/awd_throughput.py [--rounds 2] [--shapes small,paper]
"""

from __future__ import annotations

import argparse
import sys

from harness.corpora import short_eval_data
from harness.paths import cleanup, scratch_dir
from harness.reporting import header, legend, markdown_table, ratio_span
from harness.runs import PAPER, SMALL, overrides, run_training, shell_line
from harness.timing import median, round_order

# (max_steps, log_every): the paper shape is ~10x slower per step on CPU, so fewer steps.
SHAPES = {
    "small": (SMALL, 60, 10),
    "paper": (PAPER, 8, 2),
}
# (label, ranks, OMP_NUM_THREADS or None for the engine's default split)
CONFIGS = [("1 rank", 1, None), ("2 ranks", 2, None), ("1 rank, 1 thread", 1, 1)]


def windows(run, log_every: int) -> list[tuple[float, float]]:
    """(tokens/s, ms/step) per logged window, the first one dropped."""
    rows = run.metrics("train")
    out = []
    for prev, cur in zip(rows, rows[1:]):
        if cur["step"] - prev["step"] == log_every:
            out.append((cur["tokens_per_s"], 1000.0 * (cur["time"] - prev["time"]) / log_every))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--shapes", default="small,paper")
    ap.add_argument("--no-single-thread", action="store_true", help="skip the 1 rank, 1 thread row")
    args = ap.parse_args()
    shapes = args.shapes.split(",")
    configs = CONFIGS[:2] if args.no_single_thread else CONFIGS

    header(f"{args.rounds} rounds", f"shapes {args.shapes}")
    data = short_eval_data()
    base = {"data.root": data, "data.verify": False, "data.download": False, "train.eval_every": 0,
            "train.checkpoint_every": 0, "train.test_at_end": False, "train.progress": False}
    results: dict[tuple[str, str], list[list[tuple[float, float]]]] = {}  # per round, its windows
    commands = []
    order = [(s, c) for s in shapes for c in configs]
    try:
        for r in range(args.rounds):
            for shape, (label, ranks, threads) in round_order(order, r):
                model, steps, log_every = SHAPES[shape]
                sets = overrides(base, model, {"train.max_steps": steps, "train.log_every": log_every})
                run_dir = scratch_dir(f"tput-{shape}-{ranks}r-")
                run = run_training(ranks, run_dir / "run", sets, threads)
                w = windows(run, log_every)
                results.setdefault((shape, label), []).append(w)
                # part of the report: contention shows here, not in the medians
                print(f"round {r + 1} {shape:5s} {label:16s} wall {run.wall_s:4.0f} s  cores used "
                      f"{run.cores_used:.2f}  load {run.load_avg:.1f}  tokens/s " + " ".join(f"{t:.0f}" for t, _ in w),
                      flush=True)
                if r == 0:
                    commands.append(("OMP_NUM_THREADS=1 " if threads else "") + shell_line(run.cmd))
                cleanup(run_dir)
    finally:
        cleanup(data.parent)

    rows = []
    for shape in shapes:
        one = [median(t for t, _ in w) for w in results[(shape, "1 rank")]]
        for label, _, _ in configs:
            runs = results[(shape, label)]
            w = [x for run in runs for x in run]
            ratio = [median(t for t, _ in run) / o for run, o in zip(runs, one)]
            rows.append([shape, label, len(w), median(t for t, _ in w), median(ms for _, ms in w), median(ratio),
                         ratio_span(ratio)])
    print("\ncommands (round 1; the run directory and port differ per run):")
    print("\n".join(f"  {c}" for c in commands))
    legend(__doc__)
    print()
    print(markdown_table(["shape", "config", "windows", "tokens/s (median)", "ms/step (median)",
                          "vs 1 rank (median of rounds)", "vs 1 rank, rounds min .. max"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
