"""ImageNet recipe configs: a drop cutoff at or past ``train.epochs`` is refused when the config is validated,
before any rank starts, in one line naming both values."""

import pytest

from harness.launching import error_lines, launch
from trainer.errors import ConfigError
from trainer.registry import get_recipe
from trainer.schedules import DropTiming


def load(recipe, *overrides):
    return get_recipe(recipe).load_config([], list(overrides))


@pytest.mark.parametrize("recipe, overrides, words", [
    ("vit_t_early_dropout", ["train.epochs=50"], "drop.cutoff_epoch=50 is not before train.epochs=50: early dropout"),
    ("vit_t_early_dropout", ["drop.cutoff_epoch=300"], "drop.cutoff_epoch=300 is not before train.epochs=300"),
    ("mixer_b_late_sd", ["train.epochs=40"],
     "drop.cutoff_epoch=50 is not before train.epochs=40: late stochastic depth would never start"),
    ("vit_t_early_dropout", ["drop.dropout_cutoff_epoch=400"], "drop.dropout_cutoff_epoch=400 is not before"),
])
def test_cutoff_not_before_the_end_is_a_one_line_config_error(recipe, overrides, words):
    with pytest.raises(ConfigError) as err:
        load(recipe, *overrides)
    msg = str(err.value)
    assert "\n" not in msg and words in msg


def test_cutoffs_the_run_reaches_load():
    assert load("vit_t_early_dropout", "train.epochs=51").drop.cutoff_epoch == 50
    assert load("vit_t_early_dropout", "train.epochs=50", "drop.dropout=0").drop.dropout == 0.0  # nothing scheduled
    assert load("vit_t", "train.epochs=1").train.epochs == 1  # standard: no cutoff to check


def test_drop_timing_checks_its_cutoff():
    """The language-model recipes' schedule section offers the same check for their configs' validators."""
    DropTiming(mode="early", cutoff_epoch=2).check_epochs(3)
    with pytest.raises(ValueError, match="drop.cutoff_epoch=3 is not before train.epochs=3: early dropout"):
        DropTiming(mode="early", cutoff_epoch=3).check_epochs(3)


def test_train_refuses_before_starting(tmp_path):
    run_dir = tmp_path / "run"
    proc = launch("train.py", ["--recipe", "vit_t_early_dropout", "--run-dir", str(run_dir), "--set",
                               "train.epochs=10", "drop.cutoff_epoch=10"])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    (line,) = error_lines(proc)
    assert "drop.cutoff_epoch=10 is not before train.epochs=10" in line
    assert not run_dir.exists()
