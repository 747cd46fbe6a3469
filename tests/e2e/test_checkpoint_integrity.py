"""Checkpoints are written atomically, verified on load, and a damaged one gives way to the previous good one."""

import json
import shutil
import signal

import pytest

from harness.launching import check, error_lines, launch, output
from harness.metrics import read_metrics
from harness.shapes import TINY
from trainer.checkpoint import MANIFEST, callback_file, verify


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_data):
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    check(launch("train.py", ["--recipe", "awd_ptb", "--run-dir", str(run_dir), "--set", *TINY, "train.max_steps=8",
                              "train.checkpoint_every=2", "train.eval_every=4", "train.keep_last=3"]))
    return run_dir


def copy_run(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    return run_dir


def test_saves_are_complete_verified_and_pruned(trained):
    ckpt = trained / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["best", "step_00000004", "step_00000006",
                                                                  "step_00000008"]
    assert (ckpt / "latest").read_text() == "step_00000008"
    for tag in ("best", "step_00000008"):
        manifest = json.loads((ckpt / tag / MANIFEST).read_text())
        assert {"mp_rank_00_model_states.pt", "rank_00000.pt"} <= set(manifest)
        assert verify(ckpt, tag) is None
    assert not list(ckpt.glob("*.partial")) and not list(ckpt.glob("*.old")) and not list(ckpt.glob("*.tmp"))


def test_resume_skips_truncated_and_corrupted_checkpoints(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    ckpt = run_dir / "checkpoints"
    states = ckpt / "step_00000008" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])  # truncated
    rank_file = ckpt / "step_00000006" / "rank_00000.pt"
    data = bytearray(rank_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    rank_file.write_bytes(bytes(data))

    out = check(launch("train.py", ["--run-dir", str(run_dir), "--resume", "--set", "train.max_steps=10"]))
    assert "checkpoint step_00000008 is unusable (mp_rank_00_model_states.pt has" in out
    assert "checkpoint step_00000006 is unusable (rank_00000.pt does not match its SHA-256" in out
    assert "resumed from step_00000004 at step 4" in out
    assert (ckpt / "latest").read_text() == "step_00000010"
    for tag in ("step_00000006", "step_00000008", "step_00000010"):  # rewritten by the resumed run
        assert verify(ckpt, tag) is None


def test_no_usable_checkpoint_is_a_one_line_error_that_keeps_the_files(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    ckpt = run_dir / "checkpoints"
    for tag in ("step_00000004", "step_00000006", "step_00000008"):
        (ckpt / tag / "mp_rank_00_model_states.pt").write_bytes(b"garbage")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = launch("train.py", ["--run-dir", str(run_dir), "--resume"])
    errors = error_lines(proc)
    assert proc.returncode == 2 and len(errors) == 1, output(proc)[-3000:]
    assert "no usable checkpoint" in errors[0] and "step_00000008 is unusable" in errors[0]
    assert "Traceback" not in output(proc)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_a_sigkill_during_a_save_leaves_the_previous_checkpoint_to_resume_from(trained, tmp_path):
    """The resumed run really SIGKILLed halfway through writing step 10's checkpoint (TRAINER_FAULTS
    ``sigkill_save``: its files staged under ``step_00000010.partial``, no manifest, nothing published):
    ``latest`` still names step 8, intact; the next resume drops the unfinished save, continues from step 8 and
    finishes."""
    run_dir = copy_run(trained, tmp_path)
    ckpt = run_dir / "checkpoints"
    args = ["--run-dir", str(run_dir), "--resume", "--set", "train.max_steps=12"]
    killed = launch("train.py", args, env={"TRAINER_FAULTS": "sigkill_save@10:0"})
    assert killed.returncode == -signal.SIGKILL, output(killed)[-3000:]
    staged = {p.name for p in (ckpt / "step_00000010.partial").iterdir()}
    assert {"mp_rank_00_model_states.pt", "rank_00000.pt", callback_file("nt_asgd")} <= staged
    assert MANIFEST not in staged
    assert (ckpt / "latest").read_text() == "step_00000008" and not (ckpt / "step_00000010").exists()

    out = check(launch("train.py", args))
    assert "removing step_00000010.partial" in out
    assert "resumed from step_00000008 at step 8" in out
    assert (ckpt / "latest").read_text() == "step_00000012" and not list(ckpt.glob("*.partial"))
    assert verify(ckpt, "step_00000010") is None and verify(ckpt, "step_00000012") is None
    assert [r["step"] for r in read_metrics(run_dir, "train")][-4:] == [9, 10, 11, 12]


def test_a_crash_between_the_renames_of_a_replaced_tag_is_repaired_on_resume(trained, tmp_path):
    """A crash between the two renames that replace ``best`` leaves ``best.old`` and no ``best`` (a kill
    mid-write is the test above); ``latest`` never names it, and the resume puts ``best`` back."""
    run_dir = copy_run(trained, tmp_path)
    ckpt = run_dir / "checkpoints"
    (ckpt / "best").rename(ckpt / "best.old")
    check(launch("train.py", ["--run-dir", str(run_dir), "--resume", "--set", "train.max_steps=9",
                              "train.checkpoint_every=100"]))
    assert (ckpt / "best").is_dir() and not (ckpt / "best.old").exists()


def test_evaluating_a_damaged_checkpoint_names_the_file(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    rank_file = run_dir / "checkpoints" / "best" / "rank_00000.pt"
    rank_file.write_bytes(rank_file.read_bytes()[:-10])
    proc = launch("evaluate.py", ["--run-dir", str(run_dir), "--checkpoint", "best"])
    errors = error_lines(proc)
    assert proc.returncode == 2 and len(errors) == 1, output(proc)[-3000:]
    assert "rank_00000.pt has" in errors[0] and "truncated" in errors[0] and "--checkpoint" in errors[0]
