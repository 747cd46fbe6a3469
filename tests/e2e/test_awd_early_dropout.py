"""Early dropout on AWD-LSTM (drop.* keys): every scheduled rate starts at the model's configured value, falls
linearly, and is 0 on the live model from the cutoff on; a 2-rank run on a slice of real PTB."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from harness.launching import check, launch
from trainer.batching import plan_batch
from trainer.distributed import DistContext
from trainer.registry import get_recipe

RATES = {"dropout": 0.4, "dropouth": 0.25, "dropouti": 0.4, "dropoute": 0.1, "wdrop": 0.5}


def test_awd_early_dropout_rates_fall_to_zero_at_the_cutoff(ptb_slice, tmp_path):
    sets = [f"data.root={ptb_slice}", "data.verify=false", "data.download=false", "model.emsize=32",
            "model.nhid=48", "data.bptt=20", "train.epochs=3", "drop.cutoff_epoch=2", "train.log_every=5",
            "train.progress=false", "train.test_at_end=false"]
    run = tmp_path / "run"
    check(launch("train.py", ["--recipe", "awd_ptb_early_dropout", "--run-dir", str(run), "--set", *sets], ranks=2))

    spec = get_recipe("awd_ptb_early_dropout")
    recipe = spec.factory(spec.load_config([], sets), DistContext(0, 2, 0, torch.device("cpu")))
    recipe.setup()
    cut = 2 * recipe.train_data(plan_batch(20, 2, 0)).steps_per_epoch()  # the schedule's cutoff step, as the run's

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    for name, base in RATES.items():
        values = {e.step: e.value for e in acc.Scalars(f"drop/{name}")}
        steps = sorted(values)
        assert steps == list(range(1, len(steps) + 1)) and len(steps) > cut + 3, name
        expected = [base * (1 - s / (cut - 1)) if s < cut else 0.0 for s in range(len(steps))]
        assert [values[s + 1] for s in range(len(steps))] == pytest.approx(expected, abs=1e-6), name
        assert values[1] == pytest.approx(base) and values[cut] == 0.0 and values[steps[-1]] == 0.0


def test_late_linear_is_a_one_line_config_error(tmp_path):
    proc = launch("train.py", ["--recipe", "awd_ptb_late_dropout", "--run-dir", str(tmp_path / "x"), "--set",
                               "drop.schedule=linear"])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "drop.schedule: late allows constant only" in proc.stderr
