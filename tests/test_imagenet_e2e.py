"""The ImageNet recipes end to end on a generated ImageFolder: 2-rank ViT and Mixer runs on CPU that learn,
log the scheduled drop rates and the loader's rate every step, evaluate exactly on 1 rank, and resume
mid-schedule."""

import json
import shutil

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import check, error_lines, launch, make_image_folder, metric_value

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images") / "imagenet", corrupt=True)


def common(root, epochs):
    return [f"data.root={root}", "data.batch_size=32", "data.image_size=32", "data.workers=1",
            f"train.epochs={epochs}", "train.log_every=1", "train.progress=false", "optim.lr=2e-3",
            "optim.lr_batch=32", "optim.warmup_epochs=1", "optim.min_lr=1e-5"]


VIT = ["model.kwargs={patch_size: 8, embed_dim: 48, depth: 3, num_heads: 3}"]


def records(run_dir, split):
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r["split"] == split and "source" not in r]


def scalars(run_dir, tag):
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.fixture(scope="module")
def vit_run(images, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("vit") / "run"
    check(launch("train.py", ["--recipe", "vit_t_early_dropout", "--run-dir", str(run_dir), "--set",
                              *common(images, 8), *VIT, "drop.dropout=0.3", "drop.cutoff_epoch=4"], ranks=2))
    return run_dir


def test_vit_early_dropout_learns(vit_run):
    valid = records(vit_run, "valid")
    assert [r["step"] for r in valid] == [3 * e for e in range(1, 9)]  # once per epoch
    assert valid[-1]["top1"] >= 60.0, valid[-1]  # chance is 25%
    assert valid[-1]["top5"] == 100.0  # 4 classes
    assert valid[-1]["loss"] < 0.9 * valid[0]["loss"]
    assert valid[-1]["skipped_train_images"] >= 1  # the broken file, counted over ranks instead of crashing
    assert (vit_run / "checkpoints" / "best").is_dir()


def test_early_dropout_falls_linearly_to_zero_at_the_cutoff(vit_run):
    # 3 steps per epoch, cutoff epoch 4: steps 0..11 go from 0.3 to 0 linearly, then 0. The tag holds the rate
    # read back from the live model's dropout modules before each optimizer step, under the step it leads to.
    dropout = scalars(vit_run, "drop/dropout")
    assert sorted(dropout) == list(range(1, 25))
    expected = [0.3 * (1 - s / 11) if s < 12 else 0.0 for s in range(24)]
    assert [dropout[s + 1] for s in range(24)] == pytest.approx(expected, abs=1e-6)
    assert set(scalars(vit_run, "drop/drop_path").values()) == {0.0}
    for tag in ("train/loss", "train/lr", "valid/loss", "valid/top1", "valid/top5", "perf/samples_per_s"):
        assert scalars(vit_run, tag), tag


def test_the_loaders_rate_is_logged_beside_the_models(vit_run):
    """Images per second the training loop waited on its loader (summed over ranks), at the model's cadence."""
    loader, model = scalars(vit_run, "perf/loader_samples_per_s"), scalars(vit_run, "perf/samples_per_s")
    assert sorted(loader) == sorted(model) == list(range(1, 25))  # train.log_every=1
    assert all(v > 0 for v in loader.values())


def test_one_rank_evaluation_matches_the_two_rank_log(vit_run):
    out = check(launch("evaluate.py", ["--run-dir", str(vit_run), "--checkpoint", "latest"]))
    assert metric_value(out, "top1") == pytest.approx(records(vit_run, "valid")[-1]["top1"], abs=1e-9)


@pytest.fixture(scope="module")
def mixer_run(images, tmp_path_factory):
    """Late stochastic depth 0.4 from epoch 3 of 6; stopped at step 7 (mid epoch 3), then resumed."""
    run_dir = tmp_path_factory.mktemp("mixer") / "run"
    args = ["--recipe", "mixer_b_late_sd", "--run-dir", str(run_dir), "--set", *common(images, 6),
            "model.name=mixer_s32_224", "data.image_size=64", "drop.cutoff_epoch=3", "train.checkpoint_every=1",
            "data.mixup=0.0", "data.cutmix=0.0"]
    check(launch("train.py", [*args, "train.max_steps=7"], ranks=2))
    first = dict(scalars(run_dir, "drop/drop_path"))
    out = check(launch("train.py", ["--run-dir", str(run_dir), "--resume", "--set", "train.max_steps=0"], ranks=2))
    assert "resumed from step_00000007 at step 7" in out
    return run_dir, first


def test_late_stochastic_depth_starts_at_the_cutoff_and_resume_continues_it(mixer_run):
    run_dir, before_resume = mixer_run
    assert sorted(before_resume) == list(range(1, 8))
    drop_path = scalars(run_dir, "drop/drop_path")
    assert sorted(drop_path) == list(range(1, 19))  # the resumed run went on from step 8, not from 1
    assert [drop_path[s] for s in range(1, 19)] == pytest.approx([0.0] * 9 + [0.4] * 9)  # float32 events
    assert set(scalars(run_dir, "drop/dropout").values()) == {0.0}


def test_mixer_learns(mixer_run):
    run_dir, _ = mixer_run
    valid = records(run_dir, "valid")
    assert valid[-1]["step"] == 18 and valid[-1]["top1"] >= 60.0, valid[-1]
    assert valid[-1]["loss"] < 0.5 * valid[0]["loss"]
    steps = [r["step"] for r in records(run_dir, "train")]
    assert steps == sorted(set(steps)) and steps[-1] == 18  # no step logged twice across the resume


def test_unknown_model_is_a_one_line_error(images, tmp_path):
    proc = launch("train.py", ["--recipe", "vit_t", "--run-dir", str(tmp_path / "x"), "--set", *common(images, 1),
                               "model.name=vit_tiny_patch16_22"])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    (line,) = error_lines(proc)
    assert "vit_tiny_patch16_22" in line and "did you mean 'vit_tiny_patch16_224'" in line
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_missing_image_folder_is_a_one_line_error(tmp_path):
    proc = launch("train.py", ["--recipe", "vit_t", "--run-dir", str(tmp_path / "x"), "--set",
                               *common(tmp_path / "nowhere", 1)])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    (line,) = error_lines(proc)
    assert "nowhere" in line


def test_gradient_analysis_is_logged_on_two_ranks(images, tmp_path):
    run_dir = tmp_path / "run"
    check(launch("train.py", ["--recipe", "vit_t_early_dropout", "--run-dir", str(run_dir), "--set",
                              *common(images, 2), *VIT, "drop.cutoff_epoch=1", "analysis.enabled=true",
                              "analysis.every=3", "analysis.batches=2", "analysis.reference_batches=3"], ranks=2))
    values = {tag: scalars(run_dir, f"analysis/{tag}") for tag in
              ("grad_norm", "distance_from_init", "grad_direction_variance", "grad_direction_error")}
    assert all(sorted(v) == [3, 6] for v in values.values()), values
    assert 0 < values["distance_from_init"][3] < values["distance_from_init"][6]
    assert values["grad_norm"][3] > 0
    for tag in ("grad_direction_variance", "grad_direction_error"):
        assert all(0.0 < x < 2.0 for x in values[tag].values()), (tag, values[tag])
