#!/usr/bin/env python
"""What a healthy AWD-LSTM run looks like: awd_ptb at the small shape on real PTB for a few epochs on 2 ranks, its
validation perplexity after every epoch and its training loss, drawn into a PNG that BENCHMARKS.md shows.

Recipe defaults except the shape (emsize 200, nhid 400; batch 20, BPTT 70, lr 30, clip 0.25, every dropout at the
paper's rate). The verdict passes when validation improves after every epoch (at this shape and length NT-ASGD's
trigger should not fire: SGD is still making progress).

    python bench/awd_learning_curve.py [--epochs 5] [--ranks 2] [--seed 1] [--png bench/figures/awd_learning_curve.png]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from harness.paths import DATA_ROOT, REPO, cleanup, scratch_dir
from harness.reporting import header, markdown_table, progress, verdict
from harness.runs import SMALL, overrides, shell_line, start_run


def draw(train: list[dict], valid: list[dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([r["epoch"] for r in train], [math.exp(min(r["loss"], 50)) for r in train], lw=1, alpha=0.6,
            label="train ppl (50-step windows, dropout on)")
    ax.plot([r["epoch"] for r in valid], [r["ppl"] for r in valid], "o-", lw=2, label="valid ppl (after each epoch)")
    for r in valid:
        ax.annotate(f"{r['ppl']:.0f}", (r["epoch"], r["ppl"]), textcoords="offset points", xytext=(0, 8),
                    ha="center", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--png", type=Path, default=Path("bench/figures/awd_learning_curve.png"))
    ap.add_argument("--poll", type=float, default=120.0, help="seconds between progress lines")
    args = ap.parse_args()

    header(f"awd_ptb, small shape, {args.epochs} epochs", f"{args.ranks} ranks", f"seed {args.seed}")
    sets = overrides({"data.root": DATA_ROOT, "seed": args.seed, "train.epochs": args.epochs, "train.log_every": 50,
                      "train.test_at_end": False, "train.progress": False}, SMALL)
    root = scratch_dir("curve-")
    try:
        run = start_run(args.ranks, root / "run", sets)
        print(shell_line(run.cmd), flush=True)

        def report(r) -> None:
            rows = r.metrics("train")
            if rows:
                progress(f"  step {rows[-1]['step']} epoch {rows[-1]['epoch']:.2f} loss {rows[-1]['loss']:.3f}")

        run.wait(poll_s=args.poll, report=report)
        train, valid = run.metrics("train"), run.metrics("valid")
    finally:
        cleanup(root)
    print()
    print(markdown_table(["epoch", "step", "valid ppl", "valid loss", "train loss (last window)", "minutes"],
                         [[round(v["epoch"]), v["step"], f"{v['ppl']:.1f}", f"{v['loss']:.4f}",
                           f"{max((t for t in train if t['step'] <= v['step']), key=lambda t: t['step'])['loss']:.4f}",
                           f"{v['time'] / 60:.1f}"] for v in valid]))
    asgd = [t["asgd_start_step"] for t in train if "asgd_start_step" in t]
    print(f"\nNT-ASGD: {'averaging from step ' + str(asgd[0]) if asgd else 'not triggered (plain SGD throughout)'}")
    png = args.png if args.png.is_absolute() else REPO / args.png
    draw(train, valid, png, f"awd_ptb 200/400/3, batch 20, BPTT 70, seed {args.seed}, {args.ranks} ranks")
    print(f"\n![validation perplexity per epoch and training loss]({png.relative_to(REPO)})")
    improving = all(b["loss"] < a["loss"] for a, b in zip(valid, valid[1:]))
    return verdict("validation improves after every epoch", ["PASS" if improving and len(valid) > 1 else "FAIL"])


if __name__ == "__main__":
    sys.exit(main())
