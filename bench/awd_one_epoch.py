#!/usr/bin/env python
"""One full epoch of awd_ptb at the small shape on real PTB, on 1 rank and on 2 ranks, side by side.

The same seed must give the same run whatever the world size (every dropout mask is drawn for the global batch
and each rank takes its columns): the verdict fails when the two validation perplexities differ by more than
``--budget`` (relative). Also what an epoch costs on this machine. No tuning: recipe defaults except the shape.

    python bench/awd_one_epoch.py [--ranks 1 2] [--budget 0.005] [--keep]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (DATA_ROOT, SMALL, cleanup, header, markdown_table, median, overrides,  # noqa: E402
                          scratch_dir, shell_line, start_run, verdict)


def progress(run) -> None:
    rows = run.metrics("train")
    if rows:
        last = rows[-1]
        print(f"  step {last['step']} epoch {last['epoch']:.2f} loss {last['loss']:.3f} "
              f"tokens/s {last['tokens_per_s']:.0f}", file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--budget", type=float, default=0.005, help="largest relative gap in validation perplexity")
    ap.add_argument("--poll", type=float, default=60.0, help="seconds between progress lines")
    ap.add_argument("--keep", action="store_true", help="keep the run directories (checkpoints, TensorBoard)")
    args = ap.parse_args()

    header("awd_ptb, small shape, one epoch", f"ranks {' and '.join(map(str, args.ranks))}")
    sets = overrides({"data.root": DATA_ROOT, "seed": 141, "train.epochs": 1, "train.log_every": 50,
                      "train.test_at_end": False, "train.progress": False}, SMALL)
    root = scratch_dir("epoch-")
    rows, ppl = [], {}
    for ranks in args.ranks:
        run = start_run(ranks, root / f"ranks{ranks}", sets)
        print(shell_line(run.cmd), flush=True)
        run.wait(poll_s=args.poll, report=progress)
        train, valid = run.metrics("train"), run.metrics("valid")
        rates = [r["tokens_per_s"] for r in train[1:]]  # first window holds warm-up
        v = valid[-1]
        ppl[ranks] = v["ppl"]
        rows.append([ranks, v["step"], v["ppl"], v["loss"], run.wall_s, v["time"], median(rates), run.cores_used])
    base = ppl[args.ranks[0]]
    gaps = {r: abs(p / base - 1) for r, p in ppl.items()}
    print()
    print(markdown_table(
        ["ranks", "steps", "valid ppl", "valid loss", "wall s (launch to exit)", "s to end-of-epoch valid",
         "tokens/s (median)", "cores used"], rows))
    worst = max(gaps.values())
    print(f"\nvalid ppl relative to {args.ranks[0]} rank(s): "
          + ", ".join(f"{r} ranks {ppl[r] / base:.5f}" for r in args.ranks) + f"; largest gap {worst:.2e}")
    if args.keep:
        print(f"run directories: {root}")
    else:
        cleanup(root)
    return verdict(f"largest relative gap in validation perplexity within {args.budget:g}",
                   ["PASS" if worst <= args.budget else "FAIL"])


if __name__ == "__main__":
    sys.exit(main())
