"""Recipe configs: defaults, layering, overrides and one-line errors that name the key."""

import pytest

from trainer.config import flatten, read_config_file, to_yaml
from trainer.errors import ConfigError
from trainer.registry import all_recipes, get_recipe


def awd(*overrides, files=()):
    return get_recipe("awd_ptb").load_config(files, list(overrides))


def test_awd_ptb_defaults_are_the_papers_command():
    c = awd()
    assert (c.model.emsize, c.model.nhid, c.model.nlayers) == (400, 1150, 3)
    assert (c.optim.lr, c.optim.clip, c.data.bptt, c.data.batch_size) == (30.0, 0.25, 70, 20)
    assert (c.model.dropout, c.model.dropouth, c.model.dropouti, c.model.dropoute, c.model.wdrop) == (
        0.4, 0.25, 0.4, 0.1, 0.5)
    assert (c.model.alpha, c.model.beta, c.optim.wdecay, c.seed, c.train.epochs) == (2.0, 1.0, 1.2e-6, 141, 500)
    assert (c.data.eval_batch_size, c.data.test_batch_size) == (10, 1)
    assert c.recipe == "awd_ptb"


def test_set_overrides_and_user_yaml_layer(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("model:\n  nhid: 400\noptim:\n  lr: 20\n")
    c = awd("model.nhid=500", "train.max_steps=7", "optim.wdecay=1e-5", files=[user])
    assert c.model.nhid == 500  # --set wins over the file
    assert c.optim.lr == 20.0 and c.train.max_steps == 7 and c.optim.wdecay == pytest.approx(1e-5)
    assert c.model.emsize == 400  # untouched defaults stay


def test_resolved_yaml_round_trips(tmp_path):
    c = awd("model.nhid=300")
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(c))
    again = get_recipe("awd_ptb").load_config([path], [])
    assert again == c


def test_data_root_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv("DSRECIPES_DATA", "/some/where")
    assert awd().data.root == "/some/where"
    assert awd("data.root=/else").data.root == "/else"


@pytest.mark.parametrize("override, key, words", [
    ("model.dropout=1.5", "model.dropout", "less than 1"),
    ("optim.lr=-1", "optim.lr", "greater than 0"),
    ("model.nhid=abc", "model.nhid", "integer"),
    ("model.nhidd=3", "model.nhidd", "did you mean 'model.nhid'"),
    ("train.zero_stage=3", "train.zero_stage", "less than or equal to 2"),
    ("data.batch_size=0", "data.batch_size", "greater than or equal to 1"),
    ("bogus=1", "bogus", "unknown key"),
])
def test_bad_values_are_one_line_errors_naming_the_key(override, key, words):
    with pytest.raises(ConfigError) as e:
        awd(override)
    msg = str(e.value)
    assert "\n" not in msg and key in msg and words in msg


def test_set_into_a_value_and_malformed_pairs():
    with pytest.raises(ConfigError, match="model.nhid' is a value"):
        awd("model.nhid.x=3")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        awd("model.nhid")


def test_bad_yaml_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml line .* not valid YAML"):
        awd(files=[bad])
    with pytest.raises(ConfigError, match="cannot read config file"):
        awd(files=[tmp_path / "missing.yaml"])


def test_registry_lists_builtin_recipes_and_rejects_unknown():
    assert "awd_ptb" in all_recipes()
    with pytest.raises(ConfigError, match="did you mean 'awd_ptb'"):
        get_recipe("awd_ptx")


def test_every_recipe_yaml_lists_every_key():
    """'Each recipe ships a YAML file with every hyperparameter': the file alone must equal the full config."""
    for spec in all_recipes().values():
        shipped = read_config_file(spec.config_file)  # with its _base_ merged underneath
        full = spec.load_config().model_dump(mode="json")
        full.pop("recipe")
        shipped_keys = flatten(shipped)
        assert set(flatten(full)) <= set(shipped_keys), spec.name




def test_a_mapping_given_for_a_section_is_merged_key_by_key():
    """--set 'drop={cutoff_epoch: 40}' (and a sweep's nested base) changes that key and keeps the section's others,
    as a --config file does: replacing the section would reset mode and schedule to their defaults."""
    spec = get_recipe("vit_t_early_dropout")
    cfg = spec.load_config([], ["drop={cutoff_epoch: 40}", "model.kwargs={depth: 2}", "model.kwargs={num_heads: 2}"])
    assert (cfg.drop.mode, cfg.drop.schedule, cfg.drop.dropout, cfg.drop.cutoff_epoch) == ("early", "linear", 0.1, 40)
    assert cfg.model.kwargs == {"depth": 2, "num_heads": 2}
    assert spec.load_config([], ["drop.cutoff_epoch=40"]).drop == cfg.drop  # the dotted key says the same
