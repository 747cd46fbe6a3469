"""A recipe from another installed package, found through the entry-point group, with no engine change."""

import textwrap

import yaml

from harness.launching import launch
from harness.paths import REPO as ROOT



def test_entry_point_recipe_is_listed_configured_and_trains(tmp_path, shared_data):
    pkg = tmp_path / "site" / "tinyrecipes"
    pkg.mkdir(parents=True)
    (pkg / "tiny.yaml").write_text((ROOT / "recipes/awd_lstm/configs/awd_ptb.yaml").read_text()
                                   .replace("emsize: 400", "emsize: 32").replace("nhid: 1150", "nhid: 48"))
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        from pathlib import Path
        from trainer.registry import RecipeSpec
        from recipes.awd_lstm.recipe import AWDLSTMRecipe

        def recipe_specs():
            return [RecipeSpec("tiny_lstm", AWDLSTMRecipe, Path(__file__).parent / "tiny.yaml", "a plug-in recipe")]
    '''))
    info = tmp_path / "site" / "tinyrecipes-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tinyrecipes\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[dsrecipes.recipes]\ntiny = tinyrecipes:recipe_specs\n")
    env = {"PYTHONPATH": str(tmp_path / "site")}

    listing = launch("train.py", ["--list-recipes"], env=env)
    assert listing.returncode == 0, listing.stderr[-2000:]
    assert "tiny_lstm" in listing.stdout and "awd_ptb" in listing.stdout

    printed = launch("train.py", ["--recipe", "tiny_lstm", "--print-config"], env=env)
    assert yaml.safe_load(printed.stdout)["model"]["nhid"] == 48

    run = tmp_path / "run"
    proc = launch("train.py", ["--recipe", "tiny_lstm", "--run-dir", str(run), "--set", f"data.root={shared_data}",
                               "train.max_steps=3", "train.test_at_end=false", "data.bptt=10", "train.log_every=1"],
                  env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert yaml.safe_load((run / "config.yaml").read_text())["recipe"] == "tiny_lstm"
    assert (run / "checkpoints" / "step_00000003" / "mp_rank_00_model_states.pt").is_file()
