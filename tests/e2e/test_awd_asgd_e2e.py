"""NT-ASGD, fine-tuning and the cache pointer end to end: real 2-rank runs on PTB, evaluated and resumed on 1 rank."""

import json
import shutil

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from harness.launching import check, error_lines, launch, metric_value
from harness.paths import SHARED_DATA
from trainer.checkpoint import callback_file


TINY = ["data.root=" + str(SHARED_DATA), "model.emsize=50", "model.nhid=60", "data.bptt=20",
        "train.test_at_end=false", "train.progress=false"]


def records(run_dir, split):
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r["split"] == split and "source" not in r]


@pytest.fixture(scope="module")
def averaged_run(tmp_path_factory):
    """Averaging forced from step 15 (optim.t0), checkpoints at 20 and 40: both after the switch."""
    run_dir = tmp_path_factory.mktemp("asgd") / "run"
    check(launch("train.py", ["--recipe", "awd_ptb", "--run-dir", str(run_dir), "--set", *TINY, "optim.t0=15",
                              "train.max_steps=40", "train.log_every=10", "train.eval_every=20",
                              "train.checkpoint_every=20"], ranks=2))
    return run_dir


def test_averaging_starts_at_t0_and_is_logged(averaged_run):
    train = records(averaged_run, "train")
    assert [(r["step"], r["asgd_averaging"], r["asgd_averaged_steps"]) for r in train] == [
        (10, 0.0, 0.0), (20, 1.0, 6.0), (30, 1.0, 16.0), (40, 1.0, 26.0)]
    assert {r["asgd_start_step"] for r in train} == {15}
    acc = EventAccumulator(str(averaged_run / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("asgd/averaging")] == [0.0, 1.0, 1.0, 1.0]
    assert [e.value for e in acc.Scalars("asgd/averaged_steps")] == [0.0, 6.0, 16.0, 26.0]
    assert (averaged_run / "checkpoints" / "step_00000040" / callback_file("nt_asgd")).is_file()
    assert not (averaged_run / "checkpoints" / "best" / callback_file("nt_asgd")).exists()  # best: the average itself


def test_one_rank_evaluation_of_the_averaged_checkpoint_matches_the_two_rank_log(averaged_run):
    logged = {r["step"]: r["ppl"] for r in records(averaged_run, "valid")}
    for which in ("latest", "step_00000020"):
        out = check(launch("evaluate.py", ["--run-dir", str(averaged_run), "--split", "valid", "--checkpoint", which]))
        step = 40 if which == "latest" else 20
        assert metric_value(out, "ppl") == pytest.approx(logged[step], rel=1e-6)


def test_resume_on_one_rank_continues_averaging(averaged_run, tmp_path):
    run_dir = tmp_path / "resumed"
    shutil.copytree(averaged_run, run_dir)
    check(launch("train.py", ["--run-dir", str(run_dir), "--resume", "--set", "train.max_steps=50"], ranks=1))
    last = records(run_dir, "train")[-1]
    assert (last["step"], last["asgd_averaged_steps"], last["asgd_start_step"]) == (50, 36.0, 15)


def pointer_ppl(run_dir, ranks, batch_size, window=500):
    args = ["--run-dir", str(run_dir), "--split", "valid", "--checkpoint", "latest", "--pointer", "--set",
            f"pointer.window={window}", f"pointer.batch_size={batch_size}"]
    return metric_value(check(launch("evaluate.py", args, ranks=ranks)), "ppl")


def test_pointer_lowers_perplexity(averaged_run):
    args = ["--run-dir", str(averaged_run), "--split", "valid", "--checkpoint", "latest"]
    plain = metric_value(check(launch("evaluate.py", args)), "ppl")
    pointer = pointer_ppl(averaged_run, 1, 1)
    assert pointer < 0.95 * plain, (pointer, plain)
    modes = [r["mode"] for r in map(json.loads, (averaged_run / "metrics.jsonl").read_text().splitlines())
             if r.get("source") == "evaluate"]
    assert "pointer" in modes


def test_pointer_streams_split_over_ranks_give_the_one_rank_perplexity(averaged_run):
    """3 streams: 2 on rank 0 and 1 on rank 1 against all 3 on one rank (float32 rounding of batched matmuls; a
    short window keeps it quick, the split is what is tested)."""
    assert pointer_ppl(averaged_run, 2, 3, 100) == pytest.approx(pointer_ppl(averaged_run, 1, 3, 100), rel=1e-6)


def test_finetune_starts_from_the_best_weights_and_averages_from_step_one(averaged_run, tmp_path):
    best = min(r["ppl"] for r in records(averaged_run, "valid"))
    run_dir = tmp_path / "ft"
    out = check(launch("train.py", ["--recipe", "awd_ptb_finetune", "--run-dir", str(run_dir), "--set", *TINY,
                                    f"train.init_from={averaged_run}", "train.max_steps=4", "train.eval_every=2",
                                    "train.log_every=2"], ranks=2))
    assert f"initialized weights from {averaged_run} checkpoint best" in out
    train, valid = records(run_dir, "train"), records(run_dir, "valid")
    assert [(r["asgd_start_step"], r["asgd_averaged_steps"]) for r in train] == [(1, 2.0), (1, 4.0)]
    assert valid[0]["ppl"] < 1.3 * best  # an untrained model sits near the vocabulary size, 10,000


def test_finetune_stops_when_validation_stalls(averaged_run, tmp_path):
    run_dir = tmp_path / "ft-diverge"
    # a learning rate far too high makes validation worse at once: the non-monotone rule must stop the run
    check(launch("train.py", ["--recipe", "awd_ptb_finetune", "--run-dir", str(run_dir), "--set", *TINY,
                              f"train.init_from={averaged_run}", "train.max_steps=30", "train.eval_every=1",
                              "train.log_every=1", "optim.lr=1000", "optim.nonmono=1"], ranks=1))
    valid = records(run_dir, "valid")
    assert valid[-1].get("stop") == "nonmono"
    assert valid[-1]["step"] < 30
    # as the reference's finetune.py, the best so far starts at the loaded weights: never beaten, they stay 'best'
    source_best = min(r["loss"] for r in records(averaged_run, "valid"))
    assert valid[0]["step"] == 0 and valid[0]["loss"] == pytest.approx(source_best, rel=1e-6)
    assert all(r["loss"] > valid[0]["loss"] for r in valid[1:])
    args = ["--split", "valid", "--checkpoint", "best"]
    kept = metric_value(check(launch("evaluate.py", ["--run-dir", str(run_dir), *args])), "loss")
    assert kept == metric_value(check(launch("evaluate.py", ["--run-dir", str(averaged_run), *args])), "loss")


def test_finetune_without_a_run_is_a_one_line_error(tmp_path):
    proc = launch("train.py", ["--recipe", "awd_ptb_finetune", "--run-dir", str(tmp_path / "x"), "--set", *TINY])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(error_lines(proc)) == 1 and "train.init_from=RUN_DIR" in error_lines(proc)[0]
