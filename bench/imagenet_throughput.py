#!/usr/bin/env python
"""Training images/s of the ImageNet recipes: the engine against a plain loop doing the same work, and the input
pipeline on its own.

Configurations, run interleaved in rounds (every configuration once per round, in reverse order every other round,
so the budgeted pair always runs back to back):

  plain loop          the recipe's own pieces in a bare PyTorch loop, no DeepSpeed, one process: its timm model and
                      AdamW (build_model, build_optimizer), its loader with the same workers and transforms, its
                      normalization and random erasing on the device (its stream's steps), its mixup / cutmix and
                      soft-target loss (recipe.loss); backward, step, zero_grad. Same device as the engine (CUDA when
                      present, else CPU with the threads the engine gives one rank), fp32; on each data source.
  engine, N rank(s)   launch/train.py as users run it (DeepSpeed, per-step agreement, schedules, logging), on
                      data.format=synthetic (the same loader serving a ready uint8 tensor) or on JPEG (a generated
                      ImageFolder of ~500x375 JPEGs through the basic recipe's RandAugment, erasing, mixup / cutmix)
  pipeline alone      the JPEG training loader of one rank iterated without a model (what it can deliver)

Both loops time the same windows: a window opens when the batch of its first step has been fetched (and
normalized and erased), and closes after the optimizer step of its log_every-th step, so each window holds
log_every steps and log_every - 1 fetches. On CUDA both hold the same GPU work: the engine waits for the GPU after
every backward (its agreement) and after a window (its logging), the plain loop waits at the same two points of a
window's last step only. The first window of every run is dropped (warm-up).

  windows             windows kept, over all rounds
  images/s            median of those windows (global: all ranks)
  vs plain loop       per round: this run's median window / that of the plain loop on the same data in the same
                      round; the median of the rounds, and min .. max over them
  vs engine 1 rank synthetic   the same against the engine at 1 rank on synthetic data (what JPEG decoding and
                      augmentation, or more ranks, cost)
  engine overhead     per round: 1 - (engine, 1 rank) / (plain loop), on the same data. Budget, on synthetic data
                      (the engine's own cost): the worst round within it, so a single round near it is no pass;
                      INCONCLUSIVE when the rounds spread wider than the budget. On JPEG: reported, not budgeted

    python bench/imagenet_throughput.py [--models vit_tiny_patch16_224,mixer_s16_224] [--rounds 3] [--steps 8]
        [--log-every 2] [--batch 32] [--ranks 1] [--sources synthetic] [--image-size 224] [--budget 0.05]
    python bench/imagenet_throughput.py --ranks 1,2 --sources synthetic,jpeg   # also JPEG and 2-rank runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from harness.images import jpeg_like_photo
from harness.paths import REPO, cleanup, scratch_dir
from harness.reporting import header, judge, legend, markdown_table, pct, pct_range, progress, ratio_span, verdict
from harness.runs import overrides, run_env, run_training, shell_line
from harness.timing import median, round_order

CLASSES = 10
IMAGES_PER_CLASS = 64


def label(config: tuple[str, int, str]) -> str:
    kind, ranks, source = config
    return f"plain loop, 1 process, {source}" if kind == "plain" else f"engine, {ranks} rank(s), {source}"


def make_jpeg_folder(root: Path) -> Path:
    """ImageNet-like files: 400-600 x 300-450 JPEGs (quality 90), 10 classes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", IMAGES_PER_CLASS), ("val", 4)):
        for c in range(CLASSES):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True)
            for i in range(n):
                w, h = int(rng.integers(400, 600)), int(rng.integers(300, 450))
                jpeg_like_photo(rng, w, h).save(d / f"{i:05d}.JPEG", quality=90)
    return root


def run_sets(args, model: str, source: str, data: Path | None) -> list[str]:
    """The overrides of one run; the plain loop reads the same ones (its recipe, batch, model and data)."""
    sets = {"model.name": model, "data.batch_size": args.batch, "data.image_size": args.image_size,
            "train.max_steps": args.steps, "train.log_every": args.log_every, "train.precision": "fp32",
            "train.eval_every": 0, "train.checkpoint_every": 100000, "train.test_at_end": False,
            "train.progress": False, "train.epochs": 1000, "optim.warmup_epochs": 0}
    if source == "synthetic":
        sets |= {"data.format": "synthetic", "data.train_size": CLASSES * IMAGES_PER_CLASS,
                 "model.num_classes": CLASSES}
    else:
        sets |= {"data.root": data}
    return overrides(sets)


def engine_run(root: Path, sets: list[str], ranks: int) -> tuple[list[float], list[str]]:
    run = run_training(ranks, root / f"run-{time.monotonic_ns()}", sets, recipe="imagenet")
    rates = [m["samples_per_s"] for m in run.metrics("train")][1:]
    cleanup(run.run_dir)
    return rates, run.cmd


def plain_run(sets: list[str]) -> tuple[list[float], list[str]]:
    """The plain loop in a fresh process, as a launched run is, with the same environment (threads)."""
    cmd = [sys.executable, "bench/imagenet_throughput.py", "--plain", *sets]
    out = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"plain loop failed: {shell_line(cmd)}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])[1:], cmd


def plain_loop(sets: list[str]) -> list[float]:
    """Images/s per window of the recipe's training work without the engine (see the module docstring)."""
    from trainer.batching import plan_batch
    from trainer.distributed import DistContext
    from trainer.launch_env import cpus_per_rank
    from trainer.precision import apply_precision
    from trainer.registry import get_recipe
    from trainer.rng import seed_everything

    spec = get_recipe("imagenet")
    cfg = spec.load_config([], sets)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cpus_per_rank())  # what the engine gives one CPU rank
    apply_precision(cfg.train.precision)
    plan = plan_batch(cfg.data.batch_size, 1, cfg.train.micro_batch_size)
    recipe = spec.factory(cfg, DistContext(0, 1, 0, device))
    recipe.setup()
    data = recipe.train_data(plan)
    seed_everything(cfg.seed)
    model = recipe.build_model().to(device).train()
    opt = recipe.build_optimizer(model)
    steps, every = cfg.train.max_steps, cfg.train.log_every
    rates, done, epoch, window = [], 0, 0, None
    while done < steps:
        for ts in data.steps(epoch):
            window = window or [time.perf_counter(), 0]  # the engine's window: opens once the batch is there
            for micro in ts.micro_batches:
                plan.weighted_loss(recipe.loss(model, micro, None)).backward()
            done, window[1], closes = done + 1, window[1] + ts.units, (done + 1) % every == 0
            if cuda and closes:
                torch.cuda.synchronize()  # where the engine's agreement waits
            opt.step()
            opt.zero_grad(set_to_none=True)
            if closes:
                rates.append(window[1] / (time.perf_counter() - window[0]))
                window = None
                if cuda:
                    torch.cuda.synchronize()  # outside the window, as the engine's logging waits
            if done >= steps:
                break
        epoch += 1
    return rates


def pipeline_rate(data: Path, batch: int, batches: int, image_size: int) -> float:
    """The basic recipe's JPEG training loader alone (1 rank's workers), images/s after the first batch."""
    from recipes.imagenet.data import build_transforms, default_workers, open_split, train_loader
    from trainer.distributed import DistContext

    split = open_split(data, "train", build_transforms(image_size, True))
    loader = train_loader(split, DistContext(0, 1, 0, torch.device("cpu")), batch, workers=default_workers())
    it = iter(loader)
    next(it)
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        try:
            n += next(it).images.size(0)
        except StopIteration:
            loader.set_epoch(loader.epoch + 1)
            it = iter(loader)
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit_tiny_patch16_224,mixer_s16_224")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    ap.add_argument("--log-every", type=int, default=2, help="steps per timed window (the engine's train.log_every)")
    ap.add_argument("--batch", type=int, default=32, help="global batch")
    ap.add_argument("--ranks", default="1", help="engine ranks to run (1 always runs: the budgeted pair)")
    ap.add_argument("--sources", default="synthetic", help="synthetic and/or jpeg (synthetic always runs)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--budget", type=float, default=0.05, help="largest engine overhead in any round")
    ap.add_argument("--plain", nargs="+", metavar="SET", help=argparse.SUPPRESS)  # internal: the plain loop
    args = ap.parse_args()
    if args.plain:
        print(json.dumps(plain_loop(args.plain)))
        return 0
    if args.steps < 2 * args.log_every:
        ap.error("--steps must give at least two windows of --log-every steps (the first is dropped)")
    sources = ["synthetic"] + [s for s in args.sources.lower().split(",") if s == "jpeg"]
    ranks = [1] + [r for r in map(int, args.ranks.split(",")) if r != 1]
    # (plain loop, engine at 1 rank) pairs per source, run back to back, then the other ranks
    configs = [c for s in sources for c in (("plain", 1, s), ("engine", 1, s))]
    configs += [("engine", r, s) for r in ranks[1:] for s in sources]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    header(f"device {device}", f"global batch {args.batch}, {args.image_size} px, fp32",
           f"{args.steps} steps per run, windows of {args.log_every}", f"{args.rounds} rounds")

    from recipes.imagenet.data import default_workers

    root = scratch_dir("imagenet-")
    models = args.models.split(",")
    rates = {m: {c: [] for c in configs} for m in models}  # [model][config][round]: that run's windows
    commands: dict[tuple, list[str]] = {}
    pipe = []
    try:
        data = make_jpeg_folder(root / "data")
        for r in range(args.rounds):
            pipe.append(pipeline_rate(data, args.batch, 8, args.image_size))
            progress(f"round {r + 1} JPEG pipeline alone: {pipe[-1]:.1f} images/s")
            for model in models:
                for config in round_order(configs, r):
                    kind, n, source = config
                    sets = run_sets(args, model, source, data)
                    windows, cmd = plain_run(sets) if kind == "plain" else engine_run(root, sets, n)
                    rates[model][config].append(windows)
                    commands.setdefault(config, cmd)
                    progress(f"round {r + 1} {model} {label(config):30s} images/s "
                             + " ".join(f"{x:.2f}" for x in windows))
    finally:
        cleanup(root)

    print("\ncommands (round 1, first model; the run directory and port differ per run):")
    for config, cmd in commands.items():
        print(f"  {label(config)}: {shell_line(cmd)}")
    legend(__doc__)
    rows, over_rows, results = [], [], []
    for model in models:
        run_medians = {c: [median(w) for w in runs] for c, runs in rates[model].items()}

        def vs(config: tuple, base: tuple) -> list[float]:
            return [a / b for a, b in zip(run_medians[config], run_medians[base])]

        for config in configs:
            plain, synthetic = vs(config, ("plain", 1, config[2])), vs(config, ("engine", 1, "synthetic"))
            rows.append([model, label(config), sum(map(len, rates[model][config])),
                         f"{median(x for w in rates[model][config] for x in w):.2f}", f"{median(plain):.3f}",
                         ratio_span(plain), f"{median(synthetic):.3f}", ratio_span(synthetic)])
            if config[:2] == ("engine", 1):
                overhead, budgeted = [1 - q for q in plain], config[2] == "synthetic"
                result = judge(min(overhead), max(overhead), args.budget) if budgeted else "not budgeted"
                results += [result] if budgeted else []
                over_rows.append([model, config[2], " ".join(pct(o) for o in overhead), pct(median(overhead)),
                                  pct_range(min(overhead), max(overhead)), result])
    print()
    print(markdown_table(["model", "config", "windows", "images/s (median)", "vs plain loop",
                          "vs plain loop, min .. max", "vs engine 1 rank synthetic",
                          "vs engine 1 rank synthetic, min .. max"], rows))
    print()
    print(markdown_table(["model", "data", "engine overhead per round", "median", "min .. max", "verdict"],
                         over_rows))
    print(f"\nJPEG pipeline alone (1 rank, {default_workers()} workers, {args.image_size} px): median "
          f"{median(pipe):.1f} images/s, rounds {min(pipe):.1f} .. {max(pipe):.1f}")
    return verdict(f"engine overhead against the plain loop, 1 rank, synthetic data, worst round within "
                   f"{args.budget:.0%}", results)


if __name__ == "__main__":
    sys.exit(main())
