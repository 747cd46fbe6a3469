"""The weight-dropped LSTM trains under ZeRO stages 0, 1 and 2, and the stages agree on the same run."""

import json

import pytest
import torch

from conftest import SHARED_DATA, check, launch

TINY = ["data.root=" + str(SHARED_DATA), "model.emsize=50", "model.nhid=60", "data.bptt=20", "train.max_steps=10",
        "train.log_every=5", "train.test_at_end=false", "train.progress=false"]


def losses(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["split"], r["step"], r["loss"]) for r in recs]


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    runs = {}
    for stage in (0, 1, 2):
        run_dir = tmp_path_factory.mktemp(f"zero{stage}") / "run"
        check(launch("train.py", ["--recipe", "awd_ptb", "--run-dir", str(run_dir), "--set", *TINY,
                                  f"train.zero_stage={stage}"], ranks=2))
        runs[stage] = run_dir
    return runs


def test_zero_stages_train_the_same_model(zero_runs):
    base = losses(zero_runs[0])
    assert [(s, n) for s, n, _ in base] == [("train", 5), ("train", 10), ("valid", 10)]
    for stage in (1, 2):
        other = losses(zero_runs[stage])
        assert [(s, n) for s, n, _ in other] == [(s, n) for s, n, _ in base]
        for (_, _, a), (_, _, b) in zip(base, other):
            assert a == pytest.approx(b, rel=1e-4), stage
        tag = zero_runs[stage] / "checkpoints" / "step_00000010"
        digests = {torch.load(tag / f"rank_{r:05d}.pt", weights_only=False)["param_digest"] for r in (0, 1)}
        assert len(digests) == 1
        assert list(tag.glob("*optim_states.pt")), "ZeRO writes partitioned optimizer states"


def test_zero2_run_resumes(zero_runs):
    run_dir = zero_runs[2]
    out = check(launch("train.py", ["--run-dir", str(run_dir), "--resume", "--set", "train.max_steps=15"], ranks=2))
    assert "resumed from step_00000010 at step 10" in out
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000015"

