#!/usr/bin/env python
"""One full epoch of awd_ptb at the small shape on real PTB, 2 ranks through ``deepspeed``.

An end-to-end check that the whole pipeline learns (validation perplexity after one epoch) and what
an epoch costs on this machine. No tuning: recipe defaults except the model shape.

    python bench/awd_one_epoch.py [--ranks 2] [--keep]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (DATA_ROOT, SMALL, cleanup, machine_line, markdown_table, median, overrides,  # noqa: E402
                          scratch_dir, shell_line, start_run)


def progress(run) -> None:
    rows = run.metrics("train")
    if rows:
        last = rows[-1]
        print(f"  step {last['step']} epoch {last['epoch']:.2f} loss {last['loss']:.3f} "
              f"tokens/s {last['tokens_per_s']:.0f}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--poll", type=float, default=60.0, help="seconds between progress lines")
    ap.add_argument("--keep", action="store_true", help="keep the run directory (checkpoints, TensorBoard)")
    args = ap.parse_args()

    print(machine_line(), flush=True)
    sets = overrides({"data.root": DATA_ROOT, "seed": 141, "train.epochs": 1, "train.log_every": 50,
                      "train.test_at_end": False, "train.progress": False}, SMALL)
    root = scratch_dir("epoch-")
    run = start_run(args.ranks, root / "run", sets)
    print(shell_line(run.cmd), flush=True)
    run.wait(poll_s=args.poll, report=progress)

    train, valid = run.metrics("train"), run.metrics("valid")
    rates = [r["tokens_per_s"] for r in train[1:]]  # first window holds warm-up
    v = valid[-1]
    print()
    print(markdown_table(
        ["ranks", "steps", "valid ppl", "valid loss", "wall s (launch to exit)", "s to end-of-epoch valid",
         "tokens/s (median)", "cores used"],
        [[args.ranks, v["step"], v["ppl"], v["loss"], run.wall_s, v["time"], median(rates), run.cores_used]]))
    print(f"run directory: {run.run_dir}" if args.keep else "")
    if not args.keep:
        cleanup(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
