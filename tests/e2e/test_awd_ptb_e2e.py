"""awd_ptb end to end: a real 2-rank DeepSpeed run on real PTB, its files read back and evaluated (resuming is
tested in test_exact_resume.py and test_faults.py)."""

import json

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from harness.launching import check, launch, metric_value
from harness.shapes import SMALL_AWD


STEPS = 200


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_data):
    run_dir = tmp_path_factory.mktemp("awd") / "run"
    args = ["--recipe", "awd_ptb", "--run-dir", str(run_dir), "--set", *SMALL_AWD,
            f"train.max_steps={STEPS}", "train.log_every=20", "train.eval_every=100", "train.checkpoint_every=100"]
    out = check(launch("train.py", args, ranks=2))
    return run_dir, out


def records(run_dir, split):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def test_training_loss_falls(run):
    run_dir, _ = run
    train = records(run_dir, "train")
    assert [r["step"] for r in train] == list(range(20, STEPS + 1, 20))
    assert all({"step", "epoch", "split", "loss", "ppl", "lr"} <= r.keys() for r in train)
    first, last = train[0]["loss"], train[-1]["loss"]
    assert last < first - 0.7, (first, last)
    valid = records(run_dir, "valid")
    assert [r["step"] for r in valid] == [100, 200]
    assert valid[-1]["ppl"] < valid[0]["ppl"] < 2000


def test_tensorboard_events_have_the_contract_tags(run):
    run_dir, _ = run
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "valid/loss", "valid/ppl", "perf/tokens_per_s"} <= tags
    assert [e.step for e in acc.Scalars("valid/ppl")] == [100, 200]
    assert [e.value for e in acc.Scalars("train/lr")] == [30.0] * (STEPS // 20)
    loss = [e.value for e in acc.Scalars("train/loss")]
    assert loss[-1] < loss[0]


def test_checkpoints_and_identical_replicas(run):
    run_dir, _ = run
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step_{STEPS:08d}"
    for tag in (f"step_{STEPS:08d}", "step_00000100", "best"):
        assert (ckpt / tag / "mp_rank_00_model_states.pt").is_file()
    digests = {}
    for tag in ("step_00000100", f"step_{STEPS:08d}"):
        ranks = [torch.load(ckpt / tag / f"rank_{r:05d}.pt", weights_only=False) for r in (0, 1)]
        assert [s["rank"] for s in ranks] == [0, 1] and all(s["world"] == 2 for s in ranks)
        assert ranks[0]["param_digest"] == ranks[1]["param_digest"], "replicas diverged"
        # each rank carries its own hidden state for its own columns of the batch
        h0, h1 = ranks[0]["recipe"]["hidden"][0][0][0], ranks[1]["recipe"]["hidden"][0][0][0]
        assert h0.shape == (1, 10, 200) and not torch.equal(h0, h1)
        digests[tag] = ranks[0]["param_digest"]
    assert digests["step_00000100"] != digests[f"step_{STEPS:08d}"]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["recipe"] == "awd_ptb" and saved["model"]["nhid"] == 200 and saved["train"]["max_steps"] == STEPS


def test_evaluate_gives_the_same_perplexity_on_1_and_2_ranks(run):
    run_dir, _ = run
    args = ["--run-dir", str(run_dir), "--split", "valid", "--checkpoint", "latest"]
    one = metric_value(check(launch("evaluate.py", args, ranks=1)), "ppl")
    two = metric_value(check(launch("evaluate.py", args, ranks=2)), "ppl")
    logged = records(run_dir, "valid")
    trained = [r for r in logged if r["step"] == STEPS and "source" not in r][0]["ppl"]
    assert one == pytest.approx(two, rel=1e-6)
    assert one == pytest.approx(trained, rel=1e-6)
    evals = [r for r in logged if r.get("source") == "evaluate"]
    assert [(r["world"], r["step"], r["checkpoint"]) for r in evals] == [(1, STEPS, f"step_{STEPS:08d}"),
                                                                          (2, STEPS, f"step_{STEPS:08d}")]
