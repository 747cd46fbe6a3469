#!/usr/bin/env python
"""The GPU machine's measurements, one part per call (bench/gpu_check.sh runs every part under its own time limit).

Parts, each appending its rows to OUT/rows.jsonl as it measures them and rewriting OUT/table.md after every row, so
a part killed at its limit leaves what it had measured:

  versions   torch, CUDA, cuDNN, DeepSpeed, timm and where each was imported from; the GPU; /dev/shm (the loaders'
             batches wait there); whether PyTorch's cuDNN takes a bf16 LSTM (the fused weight-dropped LSTM in bf16)
  syncs      host syncs per optimizer step by source line (CUDA's sync debug mode), AWD-LSTM over 10 steps (two
             in-process runs 10 steps apart: start-up, the final validation and checkpoint cancel out), fp32, bf16
  awd        AWD-LSTM at the paper's shape (400/1150/3, batch 20, BPTT 70), 60 steps per precision: tokens/s (median
             of the logged 10-step windows after the first), the PTB epoch it projects (929,589 training tokens),
             peak device memory
  vision     ViT-T and Mixer-S/32 on synthetic 224 px images at batch 256, 30 steps per precision: the engine's
             images/s and its loader's (median of windows after the first), peak device memory
  loader     the JPEG training loader alone (RandAugment, the basic recipe's transforms) on generated ~500x375
             JPEGs, two epochs: images/s once every worker has delivered a batch, with the default workers (this
             rank's CPUs but one) and with twice as many
  table      prints the table of every row so far (what bench/report.py records)

Off a CUDA device every part runs at smoke scale (a few steps of small shapes), so a CPU rehearsal exercises every
code path; its rows say "smoke (cpu)" and are no GPU figures. Timings are comparable within one run only.

    python bench/gpu_check.py PART --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from harness.corpora import short_eval_data
from harness.images import jpeg_like_photo
from harness.paths import PTB_DIR
from harness.reporting import markdown_table
from harness.timing import median

PTB_TRAIN_TOKENS = 929_589
PRECISIONS = ("fp32", "tf32", "bf16")


class Table:
    """Rows (part, configuration, measure, value) in OUT/rows.jsonl, rendered to OUT/table.md after each one."""

    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.rows_path, self.md_path = out / "rows.jsonl", out / "table.md"

    def add(self, part: str, config: str, measure: str, value) -> None:
        with self.rows_path.open("a") as f:
            f.write(json.dumps([part, config, measure, value]) + "\n")
        self.md_path.write_text(self.render() + "\n")
        print(f"{part} | {config} | {measure} | {value}", file=sys.stderr, flush=True)

    def rows(self) -> list[list]:
        if not self.rows_path.exists():
            return []
        return [json.loads(line) for line in self.rows_path.read_text().splitlines() if line.strip()]

    def render(self) -> str:
        return markdown_table(["part", "configuration", "measure", "value"], self.rows())


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def scale() -> str:
    return "" if cuda() else "smoke (cpu), "


def _module_version(name: str) -> str:
    try:
        found = version(name)
    except PackageNotFoundError:
        return "missing"
    import importlib

    module = importlib.import_module(name.replace("-", "_"))
    where = Path(module.__file__).resolve().parent.parent
    return f"{found} ({where})"


# ------------------------------------------------------------------ versions
def part_versions(t: Table) -> None:
    import torch

    t.add("versions", "python", "version", platform.python_version())
    for name in ("torch", "deepspeed", "timm", "pydantic", "numpy"):
        t.add("versions", name, "version (imported from)", _module_version(name))
    t.add("versions", "torch", "CUDA / cuDNN", f"{torch.version.cuda} / {torch.backends.cudnn.version()}")
    if cuda():
        t.add("versions", "device", "name", torch.cuda.get_device_name(0))
        x = torch.zeros(2, 3, 4, device="cuda", dtype=torch.bfloat16)
        t.add("versions", "cuDNN LSTM in bf16", "taken by the weight-dropped LSTM", bool(torch.cudnn_is_acceptable(x)))
    else:
        t.add("versions", "device", "name", "none: no CUDA device (the parts run at smoke scale)")
    shm = shutil.disk_usage("/dev/shm")
    t.add("versions", "/dev/shm", "size / free GiB", f"{shm.total / 2**30:.1f} / {shm.free / 2**30:.1f}")
    t.add("versions", "host", "CPUs this process may use", len(os.sched_getaffinity(0)))


# ------------------------------------------------------------------ in-process runs of the engine
def _fit(recipe: str, sets: list[str], run_dir: Path):
    from trainer.commands import fit_in_process

    return fit_in_process(recipe, sets, run_dir)


def _windows(run_dir: Path, key: str) -> list[float]:
    """A logged rate per window, the first (warm-up) dropped."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if r["split"] == "train" and key in r][1:]


def _peak_gib() -> str:
    import torch

    return f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if cuda() else "n/a (cpu)"


def _reset_peak() -> None:
    import gc

    import torch

    gc.collect()
    if cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _scalar(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)][1:] if tag in acc.Tags()["scalars"] else []


AWD_COMMON = ["data.verify=false", "data.download=false", "train.test_at_end=false", "train.progress=false",
              "train.eval_every=0", "train.checkpoint_every=0"]


# ------------------------------------------------------------------ syncs
def part_syncs(t: Table, work: Path) -> None:
    if not cuda():
        t.add("syncs", "AWD-LSTM", "host syncs per step", "skipped: CUDA's sync debug mode needs a CUDA device")
        return
    from trainer.host_syncs import count_host_syncs, per_step

    data = short_eval_data()
    few, more = 4, 14
    for precision in ("fp32", "bf16"):
        counts = []
        for steps in (few, more):
            sets = [*AWD_COMMON, f"data.root={data}", "model.emsize=200", "model.nhid=400", "data.batch_size=20",
                    f"train.precision={precision}", f"train.max_steps={steps}", "train.log_every=1000"]
            with count_host_syncs() as c:
                _fit("awd_ptb", sets, work / f"syncs-{precision}-{steps}")
            counts.append(c)
        found = per_step(*counts, more - few)
        config = f"AWD-LSTM 200/400/3, {precision}, over {more - few} steps"
        for source, n in sorted(found.items()) or [("(none)", 0.0)]:
            t.add("syncs", config, f"per step at {source}", f"{n:g}")


# ------------------------------------------------------------------ awd
def part_awd(t: Table, work: Path) -> None:
    data = short_eval_data()
    steps, log_every = (60, 10) if cuda() else (6, 2)
    shape = [] if cuda() else ["model.emsize=64", "model.nhid=128"]
    for precision in PRECISIONS:
        _reset_peak()
        run = work / f"awd-{precision}"
        sets = [*AWD_COMMON, f"data.root={data}", *shape, f"train.precision={precision}", f"train.max_steps={steps}",
                f"train.log_every={log_every}"]
        _fit("awd_ptb", sets, run)
        rate = median(_windows(run, "tokens_per_s"))
        config = f"{scale()}AWD-LSTM {'400/1150/3' if cuda() else '64/128/3'}, batch 20, BPTT 70, {precision}"
        t.add("awd", config, "tokens/s", f"{rate:,.0f}")
        t.add("awd", config, "s per PTB epoch (projected)", f"{PTB_TRAIN_TOKENS / rate:,.1f}")
        t.add("awd", config, "peak device memory GiB", _peak_gib())


# ------------------------------------------------------------------ vision
VISION = {"vit_t": "ViT-T/16", "mixer_s": "Mixer-S/32"}


def part_vision(t: Table, work: Path) -> None:
    batch, size, steps, log_every = (256, 224, 30, 10) if cuda() else (8, 64, 4, 2)
    for recipe, name in VISION.items():
        for precision in PRECISIONS:
            _reset_peak()
            run = work / f"{recipe}-{precision}"
            sets = ["data.format=synthetic", f"data.train_size={batch * (steps + 2)}", "model.num_classes=1000",
                    f"data.image_size={size}", f"data.batch_size={batch}", f"train.max_steps={steps}",
                    f"train.log_every={log_every}", "train.eval_every=0", "train.checkpoint_every=100000",
                    "train.test_at_end=false", "train.progress=false", f"train.precision={precision}"]
            _fit(recipe, sets, run)
            config = f"{scale()}{name}, synthetic {size} px, batch {batch}, {precision}"
            t.add("vision", config, "images/s", f"{median(_windows(run, 'samples_per_s')):,.0f}")
            t.add("vision", config, "loader images/s", f"{median(_scalar(run, 'perf/loader_samples_per_s')):,.0f}")
            t.add("vision", config, "peak device memory GiB", _peak_gib())


# ------------------------------------------------------------------ loader
def _write_jpegs(args: tuple[Path, int, int]) -> None:
    import numpy as np

    folder, seed, n = args
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = int(rng.integers(400, 600)), int(rng.integers(300, 450))
        jpeg_like_photo(rng, w, h).save(folder / f"{seed:03d}_{i:04d}.JPEG", quality=90)


def part_loader(t: Table, work: Path) -> None:
    from multiprocessing import Pool

    import torch

    from recipes.imagenet.data import build_transforms, default_workers, open_split, train_loader
    from trainer.distributed import DistContext

    classes, per_class, batch = (16, 192, 64) if cuda() else (4, 8, 4)
    root = work / "jpeg"
    folders = []
    for c in range(classes):
        for split in ("train", "val"):
            (root / split / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
        folders.append((root / "train" / f"n{c:08d}", c, per_class))
    with Pool(max(1, len(os.sched_getaffinity(0)))) as pool:
        pool.map(_write_jpegs, folders)
    split = open_split(root, "train", build_transforms(224, True))
    default = default_workers()
    for workers in (default, 2 * default):
        loader = train_loader(split, DistContext(0, 1, 0, torch.device("cpu")), batch, workers=workers)
        n, seen, t0 = 0, 0, 0.0
        for epoch in range(2):  # persistent workers go on into the second epoch
            loader.set_epoch(epoch)
            for b in loader:
                seen += 1
                if seen == workers:  # every worker has delivered its first batch: the pipeline is full
                    t0 = time.perf_counter()
                elif seen > workers:
                    n += b.images.size(0)
        rate = n / (time.perf_counter() - t0)
        which = "default" if workers == default else "twice the default"
        t.add("loader", f"{scale()}JPEG ~500x375 -> 224 px, RandAugment, batch {batch}",
              f"images/s, {workers} workers ({which})", f"{rate:,.0f}")
        del loader


PARTS = {"versions": part_versions, "syncs": part_syncs, "awd": part_awd, "vision": part_vision,
         "loader": part_loader}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=[*PARTS, "table"])
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    table = Table(args.out)
    if args.part == "table":
        print(table.render())
        return 0
    if not PTB_DIR.is_dir():
        print(f"gpu_check: no PTB at {PTB_DIR}: run bench/gpu_kit.sh (it copies it into .whl/data) and set "
              "DSRECIPES_DATA", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix=f"gpu-check-{args.part}-"))
    try:
        if args.part == "versions":
            part_versions(table)
        else:
            PARTS[args.part](table, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
