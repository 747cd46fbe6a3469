"""Sweeps end to end on a generated ImageFolder: a local grid of two tiny ViTs runs, is summarized,
is skipped when run again; slurm jobs are shown by --dry-run, the shipped sweep files included (tests/cluster
submits them to a real Slurm cluster)."""

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.images import make_image_folder
from harness.launching import check, error_lines, output
from harness.paths import REPO as ROOT


HPARAM_COLUMNS = ["drop.mode", "seed", "status"]  # the grid's axes, then the point's status
HPARAM_METRICS = ["valid_loss", "valid_top1", "valid_top5", "best_top1", "train_loss", "steps", "wall_s"]

GRID = {"drop.mode": ["standard", "early"], "seed": [0, 1]}
NAMES = ["mode-standard_seed-0", "mode-standard_seed-1", "mode-early_seed-0", "mode-early_seed-1"]
LOCAL_GRID = {"drop.mode": ["standard", "early"], "seed": [0]}  # two axes, two points: each point is a real run
LOCAL_NAMES = ["mode-standard_seed-0", "mode-early_seed-0"]


def read_hparams(event_dir) -> tuple[list[str], list[str], dict, dict[str, float]]:
    """What TensorBoard's HParams view reads from ``event_dir``: the experiment's hparam and metric names, the
    session's hparam values, and each metric's scalar."""
    from google.protobuf.json_format import MessageToDict
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    acc = EventAccumulator(str(event_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    session = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    metrics = [m.name.tag for m in experiment.metric_infos]
    values = {tag: acc.Scalars(tag)[-1].value for tag in metrics}
    return ([h.name for h in experiment.hparam_infos], metrics,
            {k: MessageToDict(v) for k, v in session.hparams.items()}, values)


def sweep_cmd(path, *flags):
    return [sys.executable, str(ROOT / "launch" / "sweep.py"), str(path), *flags]


def run_sweep(path, *flags, timeout=600):
    return subprocess.run(sweep_cmd(path, *flags), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def write_sweep(path, sweep_dir, images, **changes):
    spec = {
        "recipe": "vit_t_early_dropout",
        "sweep_dir": str(sweep_dir),
        "base": {"data.root": str(images), "data.batch_size": 32, "data.image_size": 32, "data.workers": 0,
                 "train.epochs": 2, "train.progress": False, "train.log_every": 1, "optim.lr_batch": 32,
                 "optim.warmup_epochs": 1, "drop.cutoff_epoch": 1,
                 "model.kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}},
        "grid": GRID,
        "slurm": {"nodes": 2, "gpus_per_node": 4, "partition": "dev", "time_min": 30},
        **changes,
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images") / "imagenet")


@pytest.fixture(scope="module")
def local_sweep(images, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    path = write_sweep(tmp / "sweep.yaml", tmp / "out", images, grid=LOCAL_GRID)
    out = check(run_sweep(path, "--backend", "local"))
    return path, tmp / "out", out


def test_local_sweep_runs_every_point_and_summarizes(local_sweep):
    _, root, out = local_sweep
    assert "summary: 2 finished, 0 partial, 0 missing" in out
    with (root / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == LOCAL_NAMES
    header = list(rows[0])
    for col in ("name", "status", "drop.mode", "seed", "valid_top1", "best_top1", "train_loss", "steps", "wall_s"):
        assert col in header, header
    assert all(r["status"] == "finished" and r["steps"] == "6" and float(r["wall_s"]) > 0 for r in rows)
    assert [(r["drop.mode"], r["seed"]) for r in rows] == [("standard", "0"), ("early", "0")]
    md = (root / "summary.md").read_text().splitlines()
    assert len(md) == 4 and md[0].startswith("| name | status |")
    assert (root / "summary.png").stat().st_size > 1000
    for row in rows:
        assert (root / row["name"] / "checkpoints" / "latest").is_file()
        names, metrics, values, scalars = read_hparams(root / "tensorboard" / row["name"])
        assert sorted(names) == sorted(HPARAM_COLUMNS)
        assert values == {"drop.mode": row["drop.mode"], "seed": int(row["seed"]), "status": "finished"}
        assert sorted(metrics) == sorted(f"sweep/{k}" for k in HPARAM_METRICS)
        for tag, value in scalars.items():  # float32 in the event file, 6 significant digits in the csv
            assert value == pytest.approx(float(row[tag.removeprefix("sweep/")]), rel=1e-5), tag


def test_rerun_skips_finished_points(local_sweep):
    path, root, _ = local_sweep
    out = check(run_sweep(path, "--backend", "local", timeout=120))
    assert out.count("skipped (finished)") == 2 and " start " not in out and " resume " not in out
    assert "summary: 2 finished" in out


def test_summarize_lists_missing_points(local_sweep, tmp_path):
    path, _, _ = local_sweep
    spec = yaml.safe_load(path.read_text())
    spec["grid"]["seed"] = [0, 1, 2]  # four new points, never run
    other = tmp_path / "more.yaml"
    other.write_text(yaml.safe_dump(spec))
    events = Path(spec["sweep_dir"]) / "tensorboard"
    shutil.rmtree(events)  # what the sweep's own summary wrote: --summarize alone must write it again
    out = check(run_sweep(other, "--summarize", timeout=120))
    assert "summary: 2 finished, 0 partial, 4 missing" in out
    hparams = {p.name: read_hparams(p)[2] for p in events.iterdir()}  # nothing for the missing points
    assert hparams == {name: {"drop.mode": name.split("_")[0].removeprefix("mode-"), "seed": 0, "status": "finished"}
                       for name in LOCAL_NAMES}


def test_slurm_dry_run_prints_every_job(images, tmp_path):
    path = write_sweep(tmp_path / "sweep.yaml", tmp_path / "out", images)
    out = check(run_sweep(path, "--backend", "slurm", "--dry-run", timeout=120))
    jobs = [line for line in out.splitlines() if "would submit" in line]
    assert len(jobs) == 4 and all(n in out for n in NAMES)
    slurm = [line for line in out.splitlines() if line.strip().startswith("slurm:")]
    assert len(slurm) == 4
    assert all("nodes=2" in s and "gpus_per_node=4" in s and "tasks_per_node=4" in s and "slurm_partition=dev" in s
               and "timeout_min=30" in s for s in slurm)
    assert out.count("launch/train.py --recipe vit_t_early_dropout --run-dir") == 4
    assert "drop.mode=early seed=1" in out
    assert not (tmp_path / "out" / ".submitit").exists() and not (tmp_path / "out" / NAMES[0]).exists()


@pytest.mark.parametrize("shipped", sorted((ROOT / "recipes" / "imagenet" / "sweeps").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_sweep_files_dry_run(shipped, tmp_path):
    """Every shipped sweep file is valid, each point's config builds, and its jobs are what the file asks for
    (the cluster tests run a small copy of one for real)."""
    spec = yaml.safe_load(shipped.read_text())
    spec["sweep_dir"] = str(tmp_path / "out")  # nothing may be written there by a dry run
    path = tmp_path / shipped.name
    path.write_text(yaml.safe_dump(spec))
    out = check(run_sweep(path, "--backend", "slurm", "--dry-run", timeout=120))
    points = 1
    for values in spec["grid"].values():
        points *= len(values)
    assert out.count("would submit") == points, out
    s = spec["slurm"]
    jobs = [line for line in out.splitlines() if line.strip().startswith("slurm:")]
    assert len(jobs) == points and all(f"nodes={s['nodes']}" in j and f"gpus_per_node={s['gpus_per_node']}" in j
                                       and f"tasks_per_node={s['gpus_per_node']}" in j for j in jobs), jobs
    assert out.count(f"launch/train.py --recipe {spec['recipe']} --run-dir") == points
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, expect", [
    ({"grid": {"drop.mdoe": ["early"]}}, "drop.mdoe"),
    ({"grids": {"seed": [0]}}, "grids"),
    ({"grid": {"drop.mode": ["sometimes"]}}, "drop.mode"),
    ({"recipe": "vit_t_erly_dropout"}, "vit_t_erly_dropout"),
])
def test_bad_sweep_file_is_a_one_line_error(images, tmp_path, change, expect):
    path = write_sweep(tmp_path / "sweep.yaml", tmp_path / "out", images, **change)
    proc = run_sweep(path, "--backend", "local", timeout=120)
    assert proc.returncode != 0 and "Traceback" not in output(proc)
    (line,) = error_lines(proc)
    assert expect in line, line
    assert proc.stderr.strip() == line
    assert not (tmp_path / "out").exists()


def test_rerun_resumes_a_partial_point(local_sweep, tmp_path):
    """A point cut off after epoch 1 (its log and 'latest' rolled back) resumes instead of starting over."""
    path, root, _ = local_sweep
    spec = yaml.safe_load(path.read_text())
    spec.update(sweep_dir=str(tmp_path / "out"), grid={"drop.mode": ["standard"], "seed": [0]})
    other = tmp_path / "one.yaml"
    other.write_text(yaml.safe_dump(spec))
    run = shutil.copytree(root / NAMES[0], tmp_path / "out" / NAMES[0])
    lines = (run / "metrics.jsonl").read_text().splitlines()
    keep = [ln for ln in lines if '"step": 3,' in ln or '"step": 1,' in ln or '"step": 2,' in ln]
    (run / "metrics.jsonl").write_text("\n".join(keep) + "\n")
    (run / "checkpoints" / "latest").write_text("step_00000003")
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    out = check(run_sweep(other, "--backend", "local", timeout=300))
    assert f"{NAMES[0]}: resume" in out and "resumed from step_00000003 at step 3" in out
    assert "summary: 1 finished" in out


# ------------------------------------------------------------------ a sweep run again after its file was edited
def snapshot(root) -> dict[str, str]:
    """Every file under ``root``: its relative path and the sha256 of its bytes."""
    import hashlib

    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def edited_copy(local_sweep, tmp_path, base=None, grid=None):
    """The finished local sweep copied to ``tmp_path/out``, with a sweep file whose base and grid are edited."""
    path, root, _ = local_sweep
    spec = yaml.safe_load(path.read_text())
    spec["sweep_dir"] = str(shutil.copytree(root, tmp_path / "out"))
    spec["base"].update(base or {})
    if grid is not None:
        spec["grid"] = grid
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(spec, sort_keys=False))
    return edited, tmp_path / "out"


def test_rerun_after_base_edit_stops_naming_changed_points(local_sweep, tmp_path):
    """Every backend and --summarize refuse points whose run was trained with another config, in one line,
    before writing anything into the sweep directory."""
    path, out = edited_copy(local_sweep, tmp_path, base={"train.max_steps": 3})
    before = snapshot(out)
    for flags in (["--backend", "local"], ["--backend", "hostfile"], ["--backend", "slurm"], ["--summarize"]):
        proc = run_sweep(path, *flags, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in output(proc), output(proc)
        (line,) = error_lines(proc)
        assert proc.stderr.strip() == line, flags
        assert all(name in line for name in LOCAL_NAMES), line
        assert "train.max_steps 0 -> 3" in line and "--restart-changed" in line, line
        assert "skipped" not in proc.stdout and "resume" not in proc.stdout, proc.stdout
        assert snapshot(out) == before, flags


def test_restart_changed_moves_old_runs_aside_and_trains_afresh(local_sweep, tmp_path):
    path, out = edited_copy(local_sweep, tmp_path, base={"train.max_steps": 3})
    old = {name: snapshot(out / name) for name in LOCAL_NAMES}
    text = check(run_sweep(path, "--backend", "local", "--restart-changed", timeout=300))
    for name in LOCAL_NAMES:
        (aside,) = out.glob(f"{name}.replaced-*")
        assert re.fullmatch(rf"{re.escape(name)}\.replaced-\d{{8}}-\d{{6}}", aside.name), aside.name
        assert snapshot(aside) == old[name]  # moved whole, never deleted
        (moved,) = [ln for ln in text.splitlines() if f"{name}: changed" in ln and str(aside) in ln]
        assert "train.max_steps 0 -> 3" in moved, moved
        assert f"{name}: start" in text and f"{name}: resume" not in text
        assert yaml.safe_load((out / name / "config.yaml").read_text())["train"]["max_steps"] == 3
        steps = [json.loads(ln)["step"] for ln in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert max(steps) == 3 and steps[0] == 1, steps  # a fresh run, not the old one continued
    assert "summary: 2 finished, 0 partial, 0 missing" in text
    with (out / "summary.csv").open() as f:
        assert [r["name"] for r in csv.DictReader(f)] == LOCAL_NAMES
    again = check(run_sweep(path, "--backend", "local", "--restart-changed", timeout=120))
    assert again.count("skipped (finished)") == 2 and len(list(out.glob("*.replaced-*"))) == 2


def test_status_shows_changed_points(local_sweep, tmp_path):
    path, out = edited_copy(local_sweep, tmp_path, base={"optim.lr": 0.001, "train.max_steps": 3})
    before = snapshot(out)
    text = check(run_sweep(path, "--status", timeout=120))
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.split() and ln.split()[0] in LOCAL_NAMES}
    assert sorted(lines) == sorted(LOCAL_NAMES), text
    for name, line in lines.items():
        assert line.split()[1:4] == ["changed", "requeued", "0"], line
        assert "train.max_steps 0 -> 3" in line and "optim.lr" in line and "--restart-changed" in line, line
    assert snapshot(out) == before


def test_grid_edit_runs_new_points_and_skips_unchanged_finished_ones(local_sweep, tmp_path):
    """Only the grid edited: the point left as it was is skipped, the new one runs, and nothing is moved aside,
    with --restart-changed as without it; the point no longer in the grid is left alone."""
    path, out = edited_copy(local_sweep, tmp_path, grid={"drop.mode": ["standard"], "seed": [0, 1]})
    kept = {name: snapshot(out / name) for name in LOCAL_NAMES}
    dry = check(run_sweep(path, "--backend", "local", "--dry-run", timeout=120))
    assert "mode-standard_seed-0: skipped (finished)" in dry and "mode-standard_seed-1: start" in dry, dry
    assert "changed" not in dry
    text = check(run_sweep(path, "--backend", "local", "--restart-changed", timeout=300))
    assert "mode-standard_seed-0: skipped (finished)" in text and "mode-standard_seed-1: start" in text, text
    assert "changed" not in text and not list(out.glob("*.replaced-*"))
    assert {name: snapshot(out / name) for name in LOCAL_NAMES} == kept
    assert "summary: 2 finished, 0 partial, 0 missing" in text
    assert (out / "mode-standard_seed-1" / "checkpoints" / "latest").is_file()


def test_dry_run_shows_changed_points_and_changes_nothing(local_sweep, tmp_path):
    path, out = edited_copy(local_sweep, tmp_path, base={"train.max_steps": 3})
    before = snapshot(out)
    for backend in ("local", "slurm"):
        text = check(run_sweep(path, "--backend", backend, "--dry-run", "--restart-changed", timeout=120))
        for name in LOCAL_NAMES:
            (line,) = [ln for ln in text.splitlines() if f"{name}: changed" in ln]
            assert "train.max_steps 0 -> 3" in line and f"would move {out / name} to {out / name}.replaced-" in line
        assert "skipped" not in text and "resume" not in text and text.count("--run-dir") == 2, text
        proc = run_sweep(path, "--backend", backend, "--dry-run", timeout=120)  # without the flag: what would stop it
        assert proc.returncode == 2 and sum(f"{n}: changed" in proc.stdout for n in LOCAL_NAMES) == 2, output(proc)
        (line,) = error_lines(proc)
        assert proc.stderr.strip() == line and "--restart-changed" in line
        assert snapshot(out) == before, backend


def test_changed_keys_are_shortened():
    """A point's differing keys, old -> new, the first three then how many more."""
    from trainer.sweeps.changes import Change, config_diff, describe

    old = {"recipe": "a", "seed": 0, "optim": {"lr": 0.1, "wd": 0.0}, "model": {"kwargs": {"depth": 2}}}
    new = {"recipe": "b", "seed": 1, "optim": {"lr": 0.2}, "model": {"kwargs": {"depth": 3}}, "extra": "x"}
    diffs = config_diff(old, new)
    assert [d[0] for d in diffs] == ["extra", "model.kwargs.depth", "optim.lr", "optim.wd", "recipe", "seed"]
    line = describe([Change("p1", diffs), Change("p2", [("seed", 0, 1)])], "s.yaml")
    assert "p1 (extra (unset) -> x, model.kwargs.depth 2 -> 3, optim.lr 0.1 -> 0.2 and 3 more)" in line, line
    assert "p2 (seed 0 -> 1)" in line and "\n" not in line and "--restart-changed" in line
    alike = describe([Change("p1", [("seed", 0, 1)]), Change("p2", [("seed", 0, 1)])], "s.yaml")
    assert "2 point(s) of s.yaml" in alike and "p1, p2 (seed 0 -> 1)" in alike, alike  # an edited base: named once


def test_restart_changed_refuses_a_point_still_being_trained(local_sweep, tmp_path):
    """A changed point that a live sweep process (here: this one) still trains is not moved from under it."""
    path, out = edited_copy(local_sweep, tmp_path, base={"train.max_steps": 3})
    records = json.loads((out / "jobs.json").read_text())
    records[LOCAL_NAMES[1]] = {"backend": "local", "host": socket.gethostname(), "pid": os.getpid(), "exit": None}
    (out / "jobs.json").write_text(json.dumps(records))
    before = snapshot(out)
    proc = run_sweep(path, "--backend", "local", "--restart-changed", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in output(proc), output(proc)
    (line,) = error_lines(proc)
    assert LOCAL_NAMES[1] in line and LOCAL_NAMES[0] not in line and f"sweep process {os.getpid()}" in line, line
    assert snapshot(out) == before
