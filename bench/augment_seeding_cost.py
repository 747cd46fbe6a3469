#!/usr/bin/env python
"""What seeding each training sample's augmentation costs (it makes the ImageNet loaders resume exactly), against
decoding and transforming the image without it.

``FolderSplit.__getitem__`` with a ``SampleKey`` (training: ``augment`` seeds python's, numpy's and torch's CPU
streams from mix_seeds(seed, epoch, index, 4) before the transform) against the same call with a plain index (no
seeding), on generated 500x375 JPEGs (quality 90) read from disk, through the basic recipe's training transform
(RandomResizedCrop to 224 px, flip, RandAugment rand-m9-mstd0.5-inc1, to uint8). Before each unseeded call the
streams are seeded to the same value outside its timed region (that seeding is timed on its own), so both calls
draw the same crop and the same RandAugment ops: the difference is the seeding alone. Each image is read both ways
back to back, a pair, which one first alternating; every image once per round, a new epoch (new augmentations)
every round; rounds after one warm-up round. Statistics are over all pairs: a pair's two calls see the same machine
state, which a round's sums (a round is ~0.3 s) do not.

  loader worker       timed inside a DataLoader worker process, as training runs with data.workers >= 1 (the
                      default): seeding the streams is all it adds
  training process    timed in the main process, as with data.workers=0: the training process's own streams
                      (dropout's, mixup's) are also saved and put back around the transform; not budgeted
  unseeded us         per image, median of pairs: decode + transform
  seeded us           per image, median of pairs: decode + seeding + transform
  seeding alone us    the seed derivation and seeding of the three streams, timed on its own between two images
                      (the unseeded call's untimed set-up); median of pairs
  cost                per pair: seeded / unseeded - 1; median, and the distribution-free 95% confidence interval
                      of that median (order statistics)
  budget              in a loader worker, the upper end of the CI within the budget (INCONCLUSIVE when the CI is
                      wider than the budget)

    python bench/augment_seeding_cost.py [--rounds 60] [--images 32] [--budget 0.02]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from torch.utils.data import DataLoader, Dataset

from harness.images import jpeg_like_photo
from harness.paths import cleanup, scratch_dir
from harness.reporting import header, judge, legend, markdown_table, pct, pct_range, progress, verdict
from harness.timing import median, median_ci
from recipes.imagenet.data import FolderSplit, SampleKey, build_transforms, open_split
from trainer.rng import seed_host_rng

WIDTH, HEIGHT, SIZE = 500, 375, 224


def timed_pairs(split: FolderSplit, rounds: int) -> list[tuple[float, float, float]]:
    """(seeded, unseeded, seeding alone) seconds of each pair, the first round's dropped (warm-up)."""
    out = []
    for r in range(rounds + 1):
        for i in range(len(split)):
            key = SampleKey(i, 0, r)
            times = {}
            for with_seed in ((True, False) if (i + r) % 2 == 0 else (False, True)):
                if not with_seed:
                    t0 = time.perf_counter()
                    seed_host_rng(key.augmentation_seed())  # the same draws as the seeded call
                    times["alone"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                split[key if with_seed else i]
                times[with_seed] = time.perf_counter() - t0
            if r:
                out.append((times[True], times[False], times["alone"]))
    return out


class InWorker(Dataset):
    """One item, whose reading runs every round inside the process that reads it: a DataLoader worker."""

    def __init__(self, split: FolderSplit, rounds: int) -> None:
        self.split, self.rounds = split, rounds

    def __len__(self) -> int:
        return 1

    def __getitem__(self, _: int) -> list[tuple[float, float, float]]:
        return timed_pairs(self.split, self.rounds)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--images", type=int, default=32, help="images per round, each read seeded and unseeded")
    ap.add_argument("--budget", type=float, default=0.02, help="largest cost of seeding per image in a worker")
    args = ap.parse_args()
    header(f"{args.images} JPEGs {WIDTH}x{HEIGHT} -> {SIZE} px", f"{args.rounds} rounds after 1 warm-up")
    root = scratch_dir("seeding-")
    try:
        rng, d = np.random.default_rng(0), root / "train" / "n00000000"
        d.mkdir(parents=True)
        for i in range(args.images):
            jpeg_like_photo(rng, WIDTH, HEIGHT).save(d / f"{i:05d}.JPEG", quality=90)
        split = open_split(root, "train", build_transforms(SIZE, True))
        loader = DataLoader(InWorker(split, args.rounds), batch_size=None, num_workers=1)
        places = {"loader worker": next(iter(loader))}
        progress("loader worker done")
        places["training process"] = timed_pairs(split, args.rounds)
    finally:
        cleanup(root)

    rows, results = [], []
    for place, pairs in places.items():
        costs = [s / u - 1 for s, u, _ in pairs]
        lo, hi = median_ci(costs)
        result = judge(lo, hi, args.budget) if place == "loader worker" else "not budgeted"
        if place == "loader worker":
            results.append(result)
        rows.append([place, len(pairs), 1e6 * median(u for _, u, _ in pairs), 1e6 * median(s for s, _, _ in pairs),
                     1e6 * median(a for _, _, a in pairs), pct(median(costs)), pct_range(lo, hi), result])
    legend(__doc__)
    print()
    print(markdown_table(["where", "pairs", "unseeded us", "seeded us", "seeding alone us", "cost (median)",
                          "cost, 95% CI", "verdict"], rows))
    return verdict(f"per-sample seeding in a loader worker, upper end of the 95% CI within {args.budget:.0%}",
                   results)


if __name__ == "__main__":
    sys.exit(main())
