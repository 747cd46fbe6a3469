"""The sweep's results side by side: summary.csv / .md, validation curves, TensorBoard hparams."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

from ..registry import get_recipe
from .points import Point
from .spec import SweepSpec
from .status import MISSING, point_status, read_records

# Bookkeeping in validation records that is not a result to compare.
NOT_METRICS = {"step", "epoch", "split", "time", "source", "checkpoint", "world", "mode", "stop",
               "asgd_start_step", "skipped_train_images", "skipped_val_images"}


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def wall_time(records: list[dict]) -> float | None:
    """Seconds of training: "time" restarts at 0 in a resumed process, so sum each attempt's last value."""
    times = [r["time"] for r in records if isinstance(r.get("time"), (int, float))]
    if not times:
        return None
    total, prev = 0.0, 0.0
    for t in times:
        if t < prev:
            total += prev
        prev = t
    return round(total + prev, 2)


def point_row(point: Point, best_metric: str, best_mode: str) -> tuple[dict, list[dict]]:
    records = read_records(point.run_dir)
    valid = [r for r in records if r["split"] == "valid"]
    train = [r for r in records if r["split"] == "train"]
    row = {"name": point.name, "status": point_status(point.run_dir, records), **point.values}
    if records:
        row["steps"] = max(r.get("step", 0) for r in records)
        row["epoch"] = max(r.get("epoch", 0) for r in records)
    if valid:
        for k, v in valid[-1].items():
            if k not in NOT_METRICS and isinstance(v, (int, float)):
                row[f"valid_{k}"] = v
        scores = [r[best_metric] for r in valid if isinstance(r.get(best_metric), (int, float))
                  and math.isfinite(r[best_metric])]
        if scores:
            row[f"best_{best_metric}"] = max(scores) if best_mode == "max" else min(scores)
    if train and "loss" in train[-1]:
        row["train_loss"] = train[-1]["loss"]
    row["wall_s"] = wall_time(records)
    return row, valid


def _columns(spec: SweepSpec, rows: list[dict]) -> list[str]:
    cols = ["name", "status", *spec.grid]
    for row in rows:
        cols += [k for k in row if k not in cols and k not in ("steps", "epoch", "wall_s")]
    return cols + ["steps", "epoch", "wall_s"]


def write_tables(root: Path, cols: list[str], rows: list[dict]) -> None:
    with (root / "summary.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for row in rows:
            w.writerow([_cell(row.get(c)) for c in cols])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(row.get(c)).replace("|", "\\|") for c in cols) + " |" for row in rows]
    (root / "summary.md").write_text("\n".join(lines) + "\n")


def write_curves(root: Path, curves: dict[str, list[dict]], best_metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, valid in curves.items():
        x = [r.get("epoch", r.get("step")) for r in valid]
        for ax, key in zip(axes, (best_metric, "loss")):
            pts = [(a, r[key]) for a, r in zip(x, valid) if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=name)
    for ax, key in zip(axes, (best_metric, "loss")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"valid {key}")
        ax.grid(alpha=0.3)
    if curves:
        axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(root / "summary.png", dpi=100)
    plt.close(fig)


def _hparam(value):
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value, sort_keys=True)


def write_hparams(root: Path, rows: list[dict], spec: SweepSpec) -> None:
    """One event directory per point, rewritten each time, so TensorBoard's HParams view compares them."""
    from torch.utils.tensorboard import SummaryWriter

    for row in rows:
        out = root / "tensorboard" / row["name"]
        shutil.rmtree(out, ignore_errors=True)
        metrics = {f"sweep/{k}": float(v) for k, v in row.items()
                   if (k.startswith(("valid_", "best_")) or k in ("train_loss", "steps", "wall_s"))
                   and isinstance(v, (int, float)) and math.isfinite(v)}
        if not metrics:
            continue
        with SummaryWriter(str(out)) as w:
            hparams = {k: _hparam(row[k]) for k in spec.grid}
            w.add_hparams({**hparams, "status": row["status"]}, metrics, run_name=".")


def summarize(spec: SweepSpec, points: list[Point]) -> list[dict]:
    root = Path(spec.sweep_dir)
    root.mkdir(parents=True, exist_ok=True)
    factory = get_recipe(spec.recipe).factory
    rows, curves = [], {}
    for p in points:
        row, valid = point_row(p, factory.best_metric, factory.best_mode)
        rows.append(row)
        if valid:
            curves[p.name] = valid
    write_tables(root, _columns(spec, rows), rows)
    write_curves(root, curves, factory.best_metric)
    write_hparams(root, rows, spec)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("finished", "partial", MISSING)}
    print(f"summary: {counts['finished']} finished, {counts['partial']} partial, {counts[MISSING]} missing -> "
          f"{root / 'summary.csv'}, summary.md, summary.png, tensorboard/", flush=True)
    return rows
