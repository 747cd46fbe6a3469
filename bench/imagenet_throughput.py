#!/usr/bin/env python
"""Training images/s of the ImageNet recipes at 224 px: synthetic tensors vs the JPEG pipeline, engine vs a
plain PyTorch loop, and the input pipeline on its own.

For each model (``vit_tiny_patch16_224``, ``mixer_s16_224``), interleaved in rounds:

  engine, synthetic   launch/train.py with ``data.format=synthetic`` (same loader, no decoding or augmentation)
  engine, JPEG        launch/train.py on a generated ImageFolder of ImageNet-sized JPEGs (the basic recipe's
                      RandAugment, random erasing, mixup / cutmix)
  plain loop          timm model + AdamW + the same synthetic loader, mixup / cutmix and soft-target loss in a
                      bare PyTorch loop (no DeepSpeed): engine synthetic / plain = the engine's own overhead
  pipeline only       the JPEG training loader iterated without a model: images/s it can deliver

at 1 and 2 ranks (the plain loop and the pipeline at 1 rank). The first logged window of every run is dropped
(warm-up). On a GPU node the pipeline must deliver at least the model's rate; on a CPU-only machine the loader
workers and the model share the same cores, which the table says.

    python bench/imagenet_throughput.py [--models vit_tiny_patch16_224,mixer_s16_224] [--ranks 1,2]
        [--batch 32] [--steps 8] [--rounds 1]
    python bench/imagenet_throughput.py --plain MODEL --batch B --steps N   # the plain loop alone (internal)
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import cleanup, machine_line, markdown_table, median, overrides, run_training, scratch_dir  # noqa

CLASSES = 10
IMAGES_PER_CLASS = 64


def make_jpeg_folder(root: Path) -> Path:
    """ImageNet-like files: ~500x375 JPEGs of smooth random colour fields (quality 90, ~40-80 kB)."""
    rng = np.random.default_rng(0)
    from PIL import Image

    for split, n in (("train", IMAGES_PER_CLASS), ("val", 4)):
        for c in range(CLASSES):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True)
            for i in range(n):
                w, h = int(rng.integers(400, 600)), int(rng.integers(300, 450))
                coarse = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
                field = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
                noise = rng.integers(-20, 20, (h, w, 3))
                img = Image.fromarray(np.clip(np.asarray(field) + noise, 0, 255).astype(np.uint8))
                img.save(d / f"{i:05d}.JPEG", quality=90)
    return root


def window_rates(run) -> list[float]:
    return [m["samples_per_s"] for m in run.metrics("train")][1:]


def engine_run(root: Path, model: str, ranks: int, source: str, data: Path, batch: int, steps: int) -> list[float]:
    sets = {"model.name": model, "data.batch_size": batch, "train.max_steps": steps, "train.log_every": 2,
            "train.eval_every": 0, "train.checkpoint_every": 100000, "train.test_at_end": False,
            "train.progress": False, "train.epochs": 1000, "optim.warmup_epochs": 0}
    if source == "synthetic":
        sets |= {"data.format": "synthetic", "data.train_size": CLASSES * IMAGES_PER_CLASS,
                 "model.num_classes": CLASSES}
    else:
        sets |= {"data.root": data}
    run = run_training(ranks, root / f"{model}-{ranks}-{source}-{time.monotonic_ns()}", overrides(sets),
                       recipe="imagenet")
    cleanup(run.run_dir / "checkpoints")
    return window_rates(run)


def plain_run(model: str, batch: int, steps: int) -> list[float]:
    out = subprocess.run([sys.executable, __file__, "--plain", model, "--batch", str(batch), "--steps", str(steps)],
                         cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])[1:]


def plain_loop(model_name: str, batch: int, steps: int) -> list[float]:
    """timm model, AdamW, the recipe's synthetic loader, and the basic recipe's mixup / cutmix with timm's
    soft-target loss, as the engine applies them; per-2-step images/s, as the engine logs them."""
    import timm
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2

    from recipes.imagenet.config import ImageDataConfig
    from recipes.imagenet.data import DeviceNormalize, SyntheticSplit, build_erasing, default_workers, train_loader
    from recipes.imagenet.recipe import build_mixup
    from trainer.distributed import DistContext

    torch.set_num_threads(os.cpu_count() or 1)  # what the engine gives a single rank
    model = timm.create_model(model_name, num_classes=CLASSES).train()
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-4, weight_decay=0.05)
    data, cpu = ImageDataConfig(), torch.device("cpu")
    mixup, criterion = build_mixup(data, CLASSES), SoftTargetCrossEntropy()
    normalize, erasing = DeviceNormalize(cpu), build_erasing(data.reprob, cpu)
    loader = train_loader(SyntheticSplit(CLASSES * IMAGES_PER_CLASS, 224, CLASSES),
                          DistContext(0, 1, 0, torch.device("cpu")), batch, workers=default_workers())
    rates, done, t0, n = [], 0, time.perf_counter(), 0
    while done < steps:
        for images, labels, _ in loader:
            images = erasing(normalize(images))  # the loaders send uint8; the recipe normalizes, erases, mixes
            images, targets = mixup(images, labels)
            loss = criterion(model(images), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done, n = done + 1, n + images.size(0)
            if done % 2 == 0:
                rates.append(n / (time.perf_counter() - t0))
                t0, n = time.perf_counter(), 0
            if done >= steps:
                break
    return rates


def pipeline_rate(data: Path, batch: int, batches: int) -> float:
    """The basic recipe's JPEG training loader alone (1 rank's workers), images/s after the first batch."""
    from recipes.imagenet.data import build_transforms, default_workers, open_split, train_loader
    from trainer.distributed import DistContext

    split = open_split(data, "train", build_transforms(224, True))
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
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--batch", type=int, default=32, help="global batch")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--plain", metavar="MODEL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain:
        print(json.dumps(plain_loop(args.plain, args.batch, args.steps)))
        return 0

    print(machine_line(), f"| global batch {args.batch}, {args.steps} steps per run, 224 px", flush=True)
    root = scratch_dir("imagenet-")
    try:
        data = make_jpeg_folder(root / "data")
        pipe = [pipeline_rate(data, args.batch, 8) for _ in range(args.rounds)]
        print(f"JPEG pipeline alone (1 rank, {__import__('recipes.imagenet.data', fromlist=['x']).default_workers()}"
              f" workers): {median(pipe):.1f} images/s", flush=True)
        rows = []
        for model in args.models.split(","):
            results: dict[str, list[float]] = {}
            for _ in range(args.rounds):
                plain_rates = plain_run(model, args.batch, args.steps)
                results.setdefault("plain loop, 1 process", []).extend(plain_rates)
                print(f"{model} plain loop          images/s " + " ".join(f"{r:.1f}" for r in plain_rates), flush=True)
                for ranks in map(int, args.ranks.split(",")):
                    for source in ("synthetic", "JPEG"):
                        rates = engine_run(root, model, ranks, source, data, args.batch, args.steps)
                        results.setdefault(f"engine, {ranks} rank(s), {source}", []).extend(rates)
                        print(f"{model} {ranks} rank(s) {source:9s} images/s " + " ".join(f"{r:.1f}" for r in rates),
                              flush=True)
            plain = median(results["plain loop, 1 process"])
            synthetic_1 = median(results.get("engine, 1 rank(s), synthetic", [float("nan")]))
            for label, rates in results.items():
                rate = median(rates)
                rows.append([model, label, len(rates), f"{rate:.2f}", rate / plain, rate / synthetic_1])
        print()
        print(markdown_table(["model", "config", "windows", "images/s (median)", "vs plain loop",
                              "vs engine 1 rank synthetic"], rows))
        print(f"\nJPEG pipeline alone: {median(pipe):.1f} images/s")
    finally:
        cleanup(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
