"""A recipe from another package (tests/toy_recipe: one config class, one YAML file, one recipe class), installed
with pip as users install theirs: it is listed and configured from its packaged YAML, trains on 2 ranks, resumes
from a mid-epoch checkpoint exactly where the stream was, and evaluates its best checkpoint, with no engine change."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from harness.launching import check, launch, metric_value
from harness.metrics import rows
from harness.paths import REPO as ROOT
from harness.run_dirs import cut

SETS = ["train.checkpoint_every=4", "train.keep_last=10"]


@pytest.fixture(scope="module")
def toy_env(tmp_path_factory):
    """The toy package installed (pip, its pyproject's entry point and package data) into a folder of its own, built
    from a clean copy: pip builds in the source folder, whose leftovers would stand in for what packaging forgot."""
    site, source = tmp_path_factory.mktemp("site"), tmp_path_factory.mktemp("source") / "toy_recipe"
    shutil.copytree(ROOT / "tests" / "toy_recipe", source,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(site), str(source)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (site / "toy_recipe" / "toy_regression.yaml").is_file()  # the YAML travelled as package data
    return {"PYTHONPATH": str(site)}


@pytest.fixture(scope="module")
def toy_run(toy_env, tmp_path_factory):
    run = tmp_path_factory.mktemp("toy") / "run"
    check(launch("train.py", ["--recipe", "toy_regression", "--run-dir", str(run), "--set", *SETS], ranks=2,
                 env=toy_env))
    return run


def test_an_installed_recipe_is_listed_and_configured_from_its_package(toy_env):
    listing = check(launch("train.py", ["--list-recipes"], env=toy_env))
    assert "toy_regression" in listing and "awd_ptb" in listing
    printed = launch("train.py", ["--recipe", "toy_regression", "--print-config", "--set", "model.features=5"],
                     env=toy_env)
    check(printed)
    cfg = yaml.safe_load(printed.stdout)
    assert cfg["model"] == {"features": 5, "noise": 0.1} and cfg["data"]["train_size"] == 512


def test_it_trains_on_two_ranks_and_learns(toy_run):
    log = rows(toy_run)
    train = [r for r in log if r["split"] == "train"]
    valid = [r for r in log if r["split"] == "valid"]
    assert [r["step"] for r in train] == list(range(4, 33, 4))  # 16 steps per epoch, 2 epochs, logged every 4
    assert [r["step"] for r in valid] == [16, 32]
    # y = x.w + noise(0.1) with |w|^2 ~ 8: the first steps' loss is of that order, the fit reaches the noise (0.01)
    assert train[0]["loss"] > 1.0 and valid[-1]["loss"] < 0.05, (train[0], valid)
    assert (toy_run / "checkpoints" / "best").is_dir() and (toy_run / "checkpoints" / "latest").read_text() == \
        "step_00000032"


def test_a_mid_epoch_resume_continues_where_the_stream_was(toy_run, toy_env, tmp_path):
    run = cut(toy_run, tmp_path / "cut", 20)  # epoch 2, 4 steps in
    out = check(launch("train.py", ["--run-dir", str(run), "--resume"], ranks=2, env=toy_env))
    assert "resumed from step_00000020 at step 20" in out
    assert rows(run) == rows(toy_run)  # every loss after the cut, bit for bit: the same examples in the same order


def test_evaluate_reads_the_best_checkpoint(toy_run, toy_env):
    out = check(launch("evaluate.py", ["--run-dir", str(toy_run)], env=toy_env))
    best = min(r["loss"] for r in rows(toy_run) if r["split"] == "valid")
    last = json.loads((toy_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["source"] == "evaluate" and last["checkpoint"] == "best"
    assert last["loss"] == pytest.approx(best, rel=1e-5)  # the same weights, evaluated on 1 rank instead of 2
    assert metric_value(out, "loss") == pytest.approx(last["loss"], abs=1e-6)  # printed to 6 decimals
