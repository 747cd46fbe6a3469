"""Exact resume: a 2-rank run interrupted at a checkpoint and resumed logs what the uninterrupted run logged, bit
for bit (training losses, learning rates, averaging counts, validation), for both recipe families, mid-epoch and
at an epoch's end. Every checked step draws random numbers: dropout (early schedules, still moving), DropConnect,
RandAugment, random erasing, mixup / cutmix, stochastic depth; AWD-LSTM is averaging (NT-ASGD) by then."""

import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from harness.faults import Job
from harness.images import make_image_folder
from harness.launching import check, free_port, launch
from harness.metrics import rows, scalars, wait_for_step
from harness.paths import SHARED_DATA
from harness.shapes import SMALL_AWD
from trainer.checkpoint import MODEL_STATES, callback_file, read_client_state, read_latest_tag, step_tag
from trainer.checkpoint.writing import own_entries, write_manifest

def cut_after(run_dir: Path, step: int) -> int:
    """How many rows the run had logged when it saved ``step``'s checkpoint: up to that step's training row
    (the chosen steps have no validation of their own before the save)."""
    return next(i for i, r in enumerate(rows(run_dir)) if r["split"] == "train" and r["step"] == step) + 1


def interrupt(full: Path, dest: Path, step: int) -> Path:
    """A copy of ``full`` as it would be had the run died right after saving ``step``'s checkpoint."""
    shutil.copytree(full, dest)
    metrics = dest / "metrics.jsonl"
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:cut_after(full, step)]))
    for tag in (dest / "checkpoints").glob("step_*"):
        if int(tag.name.removeprefix("step_")) > step:
            shutil.rmtree(tag)
    (dest / "checkpoints" / "latest").write_text(step_tag(step))
    return dest


def resume_and_compare(full: Path, tmp_path: Path, step: int, steps: int, before_resume=None) -> list[dict]:
    """Resume an interrupted copy to the end; returns the rows logged after ``step``, equal to the full run's."""
    run = interrupt(full, tmp_path / f"from_{step}", step)
    if before_resume is not None:
        before_resume(run, step)
    out = check(launch("train.py", ["--run-dir", str(run), "--resume"], ranks=2))
    assert f"resumed from {step_tag(step)} at step {step}" in out
    cut = cut_after(full, step)
    want, got = rows(full)[cut:], rows(run)[cut:]
    assert [r["step"] for r in got if r["split"] == "train"] == list(range(step + 1, steps + 1))
    for a, b in zip(got, want):
        assert a == b  # ==, not approx: the same bits, step by step
    assert len(got) == len(want)
    return got


def position(run_dir: Path, step: int) -> tuple[int, int]:
    """(epochs completed, steps into the epoch) saved with ``step``'s checkpoint."""
    state = read_client_state(run_dir / "checkpoints", step_tag(step))["trainer"]
    return state["epoch"], state["steps_in_epoch"]


# ------------------------------------------------------------------------------------------------ AWD-LSTM

AWD_STEPS = 24  # ~20 steps per epoch on the corpus below


@pytest.fixture(scope="module")
def awd_args(tmp_path_factory):
    """A PTB slice small enough to cross an epoch in ~20 steps; averaging forced from step 5, validation every
    4 steps (of the average), every dropout rate falling linearly over two epochs."""
    corpus = tmp_path_factory.mktemp("awd") / "ptb"
    corpus.mkdir()
    for split, lines in (("train", 60), ("valid", 30), ("test", 30)):
        text = (SHARED_DATA / "ptb" / f"{split}.txt").read_text().splitlines(keepends=True)
        (corpus / f"{split}.txt").write_text("".join(text[:lines]))
    return ["--recipe", "awd_ptb", "--set", *SMALL_AWD, f"data.root={corpus}", "data.verify=false",
            "data.download=false", "model.emsize=32", "model.nhid=48", "data.bptt=8", "data.batch_size=8",
            "train.epochs=3", f"train.max_steps={AWD_STEPS}", "train.log_every=1", "train.eval_every=4",
            "train.keep_last=100", "optim.t0=5", "drop.mode=early", "drop.schedule=linear", "drop.cutoff_epoch=2"]


@pytest.fixture(scope="module")
def awd_run(tmp_path_factory, awd_args):
    """The uninterrupted reference, with a checkpoint every step to cut it at."""
    run_dir = tmp_path_factory.mktemp("awd_run") / "run"
    check(launch("train.py", ["--run-dir", str(run_dir), *awd_args, "train.checkpoint_every=1"], ranks=2))
    return run_dir


def test_awd_resumes_exactly_at_an_epoch_end(awd_run, tmp_path):
    last = next(s for s in range(1, AWD_STEPS) if position(awd_run, s + 1) == (1, 1))  # the last step of epoch 0
    assert last % 4 and last > 5  # no validation at that step; averaging on
    resume_and_compare(awd_run, tmp_path, last, AWD_STEPS)


def to_earlier_layout(run: Path, step: int) -> None:
    """``step``'s checkpoint as the engine wrote it before loop callbacks and training streams saved their own
    state: NT-ASGD's average in averaged.pt, the data position in the loop's state; the manifest signed again."""
    tag_dir = run / "checkpoints" / step_tag(step)
    average = torch.load(tag_dir / callback_file("nt_asgd"), weights_only=False)
    del average["eval_weights"]
    torch.save(average, tag_dir / "averaged.pt")
    (tag_dir / callback_file("nt_asgd")).unlink()
    states = torch.load(tag_dir / MODEL_STATES, weights_only=False)
    states["trainer"]["position"] = states["recipe"].pop("position")
    torch.save(states, tag_dir / MODEL_STATES)
    write_manifest(tag_dir, [own_entries(tag_dir, rank) for rank in (0, 1)])


def test_awd_checkpoint_of_the_earlier_layout_resumes_exactly(awd_run, tmp_path):
    """A run started before this layout (a sweep upgraded mid-way) resumes mid-epoch while averaging, bit for bit:
    its average and its data position are read where they were then."""
    step = 7
    assert position(awd_run, step) == (0, step)
    assert {r["step"]: r for r in rows(awd_run) if r["split"] == "train"}[step]["asgd_averaging"] == 1.0
    resume_and_compare(awd_run, tmp_path, step, AWD_STEPS, before_resume=to_earlier_layout)


def test_awd_stopped_by_sigterm_resumes_exactly(awd_run, awd_args, tmp_path):
    """A real SIGTERM to the whole job (launcher and ranks, as Slurm sends it) mid-epoch 0 while averaging, no
    checkpoint due: the checkpoint the signal made, resumed, gives the uninterrupted run's rows bit for bit (the
    reference saved every step: saving changes nothing either)."""
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    threads = {k: os.environ[k] for k in ("OMP_NUM_THREADS",) if k in os.environ}  # as the reference's ranks had
    job = Job.start(["--run-dir", str(run_dir), *awd_args, "train.checkpoint_every=100000"], log, env=threads,
                    port=free_port())
    wait_for_step(run_dir, 6, lambda: not job.gone())
    os.killpg(job.proc.pid, signal.SIGTERM)
    job.wait_gone(timeout=120)
    tag = read_latest_tag(run_dir / "checkpoints")
    step = int(tag.removeprefix("step_"))
    assert f"preempted (SIGTERM) at step {step}: checkpoint {tag} written" in log.read_text()
    assert 6 <= step <= AWD_STEPS - 12  # averaging since step 5: the signal's checkpoint holds a live average
    assert position(run_dir, step)[0] == 0  # mid-epoch 0
    train = {r["step"]: r for r in rows(awd_run) if r["split"] == "train"}
    assert train[step]["asgd_averaging"] == 1.0 and train[step]["asgd_start_step"] == 5
    logged = rows(run_dir)
    assert [r["step"] for r in logged if r["split"] == "train"] == list(range(1, step + 1))
    assert logged == rows(awd_run)[:len(logged)]  # a validation at the stop step is logged too

    out = check(launch("train.py", ["--run-dir", str(run_dir), "--resume"], ranks=2))
    assert f"resumed from {tag} at step {step}" in out
    assert rows(run_dir) == rows(awd_run)  # ==, not approx
    assert sum(r["split"] == "valid" for r in rows(run_dir)[len(logged):]) >= 3  # the average, after the resume
    for name in ("dropout", "dropouth", "dropouti", "dropoute", "wdrop"):
        rates = scalars(run_dir, f"drop/{name}")
        assert all(rates[s] > 0 for s in range(step + 1, AWD_STEPS + 1)), name
        assert rates[step + 1] > rates[AWD_STEPS]  # still falling: every resumed step draws dropout masks


# ------------------------------------------------------------------------------------------------ ImageNet

IMAGE_STEPS = 5  # 3 steps per epoch: 96 images (one undecodable) over 2 ranks at 16 per rank


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A tiny ViT with the recipe's whole augmentation (RandAugment, random erasing, mixup / cutmix) in 2 loader
    workers per rank, early dropout and stochastic depth, a checkpoint every step."""
    root = tmp_path_factory.mktemp("image")
    images = make_image_folder(root / "imagenet", corrupt=True)
    run_dir = root / "run"
    check(launch("train.py", ["--recipe", "vit_t_early_dropout", "--run-dir", str(run_dir), "--set",
                              f"data.root={images}", "data.batch_size=32", "data.image_size=32", "data.workers=2",
                              "model.kwargs={patch_size: 8, embed_dim: 48, depth: 3, num_heads: 3}",
                              "train.epochs=4", f"train.max_steps={IMAGE_STEPS}", "train.log_every=1",
                              "train.checkpoint_every=1", "train.keep_last=100", "train.progress=false",
                              "optim.lr=2e-3", "optim.lr_batch=32", "optim.warmup_epochs=1",
                              "drop.dropout=0.3", "drop.drop_path=0.2", "drop.cutoff_epoch=3"], ranks=2))
    return run_dir


@pytest.mark.parametrize("stop", [2, 3], ids=["mid-epoch", "epoch-end"])
def test_imagenet_resumes_exactly(image_run, tmp_path, stop):
    assert position(image_run, stop) == (0, stop)
    got = resume_and_compare(image_run, tmp_path, stop, IMAGE_STEPS)
    assert any(r["split"] == "valid" and r["skipped_train_images"] >= 1 for r in got)  # the total goes on
    for tag in ("drop/dropout", "drop/drop_path"):
        rates = scalars(image_run, tag)
        assert all(rates[s] > 0 for s in range(stop + 1, IMAGE_STEPS + 1)), tag
