#!/usr/bin/env python
"""Training throughput of awd_ptb through the real engine: {paper, small shape} x {1, 2 ranks}.

Runs are short and interleaved (round r: every config once; odd rounds in reverse order) so drift
in the shared machine's load hits every config alike. Each run's first logged window (start-up,
allocator warm-up) is dropped; the table shows the median of the remaining windows, pooled over
rounds. tokens/s is the engine's own ``tokens_per_s`` (global, training time only); ms/step comes
from the wall time between consecutive train log lines.

A "1 rank, 1 thread" row (OMP_NUM_THREADS=1) separates the gain from data parallelism from the cost
of the engine's default of giving a lone CPU rank every core.

    python bench/awd_throughput.py [--rounds 2] [--shapes small,paper]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (PAPER, SMALL, cleanup, machine_line, markdown_table, median, overrides,  # noqa: E402
                          run_training, scratch_dir, shell_line, short_eval_data)

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

    print(machine_line(), flush=True)
    data = short_eval_data()
    base = {"data.root": data, "data.verify": False, "data.download": False, "train.eval_every": 0,
            "train.checkpoint_every": 0, "train.test_at_end": False, "train.progress": False}
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    order = [(s, c) for s in shapes for c in configs]
    try:
        for r in range(args.rounds):
            for shape, (label, ranks, threads) in (order if r % 2 == 0 else order[::-1]):
                model, steps, log_every = SHAPES[shape]
                sets = overrides(base, model, {"train.max_steps": steps, "train.log_every": log_every})
                run_dir = scratch_dir(f"tput-{shape}-{ranks}r-")
                run = run_training(ranks, run_dir / "run", sets, threads)
                w = windows(run, log_every)
                results.setdefault((shape, label), []).extend(w)
                print(f"round {r + 1} {shape:5s} {label:16s} wall {run.wall_s:4.0f} s  cores used "
                      f"{run.cores_used:.2f}  load {run.load_avg:.1f}  tokens/s "
                      + " ".join(f"{t:.0f}" for t, _ in w), flush=True)
                if r == 0:
                    print("   ", ("OMP_NUM_THREADS=1 " if threads else "") + shell_line(run.cmd), flush=True)
                cleanup(run_dir)
    finally:
        cleanup(data.parent)

    rows = []
    for shape in shapes:
        one = median(t for t, _ in results[(shape, "1 rank")])
        for label, _, _ in configs:
            w = results[(shape, label)]
            tps = median(t for t, _ in w)
            rows.append([shape, label, len(w), tps, median(ms for _, ms in w), tps / one])
    print()
    print(markdown_table(["shape", "config", "windows", "tokens/s (median)", "ms/step (median)", "vs 1 rank"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
