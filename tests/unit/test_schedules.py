"""Early/late drop-rate schedules and their application to live timm ViT and Mixer models."""

import numpy as np
import pytest
import timm
import torch
from pydantic import ValidationError
from timm.layers import DropPath
from timm.layers.attention import Attention
from timm.models.mlp_mixer import MlpMixer
from torch import nn

from recipes.imagenet.config import DropConfig
from recipes.imagenet.drop_sites import current_rates, prepare_drop_path, set_drop_path, set_dropout
from trainer.schedules import DropSchedule

# The paper's ImageNet setting scaled down: 300 epochs, early phase of 50 epochs.
KW = dict(epochs=300, steps_per_epoch=10, cutoff_epoch=50)


# --- schedules ---------------------------------------------------------------------------------

def test_standard_is_constant_everywhere():
    s = DropSchedule(0.1, "standard", **KW)
    assert [s.value(i) for i in (0, 499, 500, 2999, 5000)] == [0.1] * 5


def test_early_constant():
    s = DropSchedule(0.1, "early", "constant", **KW)
    assert s.value(0) == 0.1 and s.value(499) == 0.1
    assert s.value(500) == 0.0 and s.value(2999) == 0.0


def test_early_linear_hand_values():
    s = DropSchedule(0.1, "early", "linear", **KW)
    assert s.value(0) == 0.1
    assert s.value(499) == 0.0
    assert s.value(250) == pytest.approx(0.1 * (1 - 250 / 499), abs=1e-15)
    assert s.value(500) == 0.0 and s.value(2999) == 0.0


def test_early_linear_matches_reference_linspace():
    s = DropSchedule(0.1, "early", "linear", **KW)
    ref = np.concatenate([np.linspace(0.1, 0, 500), np.zeros(2500)])
    assert np.array_equal(np.array([s.value(i) for i in range(3000)]), ref)


def test_late_constant():
    s = DropSchedule(0.1, "late", "constant", **KW)
    assert s.value(0) == 0.0 and s.value(499) == 0.0
    assert s.value(500) == 0.1 and s.value(2999) == 0.1


def test_steps_past_the_end_keep_the_last_value():
    assert DropSchedule(0.1, "late", **KW).value(10**6) == 0.1
    assert DropSchedule(0.1, "early", "linear", **KW).value(10**6) == 0.0
    # Built directly (a config rejects it), a cutoff beyond the run: the early phase covers everything.
    s = DropSchedule(0.2, "early", "linear", cutoff_epoch=4, epochs=2, steps_per_epoch=2)  # 8 early steps
    assert [s.value(i) for i in range(4)] == pytest.approx([0.2, 0.2 * 6 / 7, 0.2 * 5 / 7, 0.2 * 4 / 7])
    assert s.value(100) == pytest.approx(0.2 * 4 / 7)
    assert DropSchedule(0.2, "early", cutoff_epoch=9, epochs=2, steps_per_epoch=3).value(100) == 0.2


def test_one_step_early_linear_phase_keeps_the_base():
    s = DropSchedule(0.3, "early", "linear", cutoff_epoch=1, epochs=3, steps_per_epoch=1)
    assert [s.value(i) for i in range(3)] == [0.3, 0.0, 0.0]


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="late"):
        DropSchedule(0.1, "late", "linear", **KW)
    with pytest.raises(ValueError, match="cutoff"):
        DropSchedule(0.1, "early", epochs=3, steps_per_epoch=2)
    with pytest.raises(ValueError):
        DropSchedule(0.1, **KW).value(-1)


def test_describe():
    assert "0.1" in DropSchedule(0.1, "standard", **KW).describe()
    assert "linear" in DropSchedule(0.1, "early", "linear", **KW).describe()
    assert "epoch 50" in DropSchedule(0.1, "late", **KW).describe()


# --- config ------------------------------------------------------------------------------------

def test_config_builds_schedules():
    cfg = DropConfig(dropout=0.1, drop_path=0.2, mode="early", schedule="linear", cutoff_epoch=50)
    s = cfg.dropout_schedule_for(300, 10)
    assert (s.base, s.mode, s.shape, s.cutoff_epoch, s.total_steps) == (0.1, "early", "linear", 50, 3000)
    assert cfg.drop_path_schedule_for(300, 10).value(0) == 0.2


def test_config_defaults_are_standard_zero():
    cfg = DropConfig()
    assert cfg.dropout_schedule_for(1, 1).value(0) == 0.0
    assert cfg.drop_path_schedule_for(1, 1).mode == "standard"


@pytest.mark.parametrize("kwargs, key", [
    (dict(mode="late", schedule="linear", cutoff_epoch=5), "schedule"),
    (dict(mode="early"), "cutoff_epoch"),
    (dict(mode="late"), "cutoff_epoch"),
    (dict(dropout_mode="late", dropout_cutoff_epoch=3, schedule="linear"), "schedule"),
    (dict(drop_path_mode="early", mode="standard"), "cutoff_epoch"),
    (dict(mode="early", cutoff_epoch=5, drop_path_cutoff_epoch=0), "drop_path_cutoff_epoch"),
])
def test_config_rejects_bad_combinations(kwargs, key):
    with pytest.raises(ValidationError) as err:
        DropConfig(**kwargs)
    assert f"{key}:" in str(err.value)


@pytest.mark.parametrize("kwargs, key, what", [
    (dict(dropout=0.1, mode="early", cutoff_epoch=300), "cutoff_epoch=300", "early dropout would never end"),
    (dict(drop_path=0.1, mode="late", cutoff_epoch=301), "cutoff_epoch=301", "late stochastic depth would never start"),
    (dict(dropout=0.1, mode="early", cutoff_epoch=50, dropout_cutoff_epoch=300), "dropout_cutoff_epoch=300",
     "early dropout"),
    (dict(drop_path=0.1, drop_path_mode="late", drop_path_cutoff_epoch=300), "drop_path_cutoff_epoch=300",
     "late stochastic depth"),
])
def test_a_cutoff_the_run_never_reaches_is_an_error(kwargs, key, what):
    with pytest.raises(ValueError) as err:
        DropConfig(**kwargs).check_epochs(300)
    msg = str(err.value)
    assert f"drop.{key} is not before train.epochs=300" in msg and what in msg and "\n" not in msg


def test_cutoffs_before_the_end_or_unused_are_fine():
    DropConfig(dropout=0.1, mode="early", cutoff_epoch=299).check_epochs(300)
    DropConfig(dropout=0.0, drop_path=0.1, mode="early", cutoff_epoch=300, drop_path_mode="standard").check_epochs(300)
    DropConfig(dropout=0.1, cutoff_epoch=500).check_epochs(300)  # standard: the cutoff is unused


def test_late_linear_message():
    with pytest.raises(ValidationError, match="late allows constant only"):
        DropConfig(mode="late", schedule="linear", cutoff_epoch=5)


def test_config_rejects_bad_values_and_unknown_keys():
    with pytest.raises(ValidationError):
        DropConfig(dropout=1.5)
    with pytest.raises(ValidationError):
        DropConfig(drop_path=-0.1)
    with pytest.raises(ValidationError, match="droput"):
        DropConfig(droput=0.1)
    cfg = DropConfig(mode="early", cutoff_epoch=5)
    with pytest.raises(ValidationError):  # assignment is validated too
        cfg.cutoff_epoch = 0


def test_per_kind_overrides():
    cfg = DropConfig(dropout=0.1, drop_path=0.2, mode="early", schedule="linear", cutoff_epoch=50,
                     drop_path_mode="standard", dropout_cutoff_epoch=20)
    d = cfg.dropout_schedule_for(300, 10)
    p = cfg.drop_path_schedule_for(300, 10)
    assert (d.mode, d.shape, d.cutoff_epoch) == ("early", "linear", 20)
    assert d.value(199) == 0.0 and d.value(0) == 0.1
    assert p.mode == "standard" and p.value(2999) == 0.2
    cfg2 = DropConfig(dropout=0.1, drop_path=0.1, mode="late", cutoff_epoch=10,
                      drop_path_mode="early", drop_path_schedule="linear", drop_path_cutoff_epoch=5)
    assert cfg2.dropout_schedule_for(20, 1).value(9) == 0.0
    assert cfg2.drop_path_schedule_for(20, 1).value(4) == 0.0
    assert cfg2.drop_path_schedule_for(20, 1).value(0) == 0.1


# --- live models -------------------------------------------------------------------------------

def tiny_vit(**kw):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=5,
                             embed_dim=32, depth=4, num_heads=2, drop_rate=0.0, drop_path_rate=0.0, **kw)


def tiny_mixer():
    # mixer_s32_224's entry point fixes embed_dim/num_blocks, so build the same class smaller directly.
    model = MlpMixer(num_classes=5, img_size=64, patch_size=32, num_blocks=3, embed_dim=32,
                     drop_rate=0.0, drop_path_rate=0.0)
    nn.init.normal_(model.head.weight)  # timm zero-inits Mixer's head, which would hide every difference
    return model


def _forward(model, x, train, seed=0):
    model.train(train)
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(x)


@pytest.fixture(params=["vit", "mixer"])
def case(request):
    torch.manual_seed(0)
    if request.param == "vit":
        return tiny_vit(), torch.randn(2, 3, 32, 32), 4
    return tiny_mixer(), torch.randn(2, 3, 64, 64), 3


def test_timm_builds_identity_drop_paths_at_rate_zero(case):
    model, _, depth = case
    slots = [(b, n) for b in model.blocks for n, _ in b.named_children() if n.startswith("drop_path")]
    assert slots and all(isinstance(getattr(b, n), nn.Identity) for b, n in slots)
    assert prepare_drop_path(model) == depth
    swapped = [getattr(b, n) for b, n in slots]
    assert prepare_drop_path(model) == depth  # idempotent: same modules, nothing new
    assert [getattr(b, n) for b, n in slots] == swapped
    assert all(isinstance(p, DropPath) and p.drop_prob == 0.0 for p in swapped)
    assert sum(isinstance(m, DropPath) for m in model.modules()) == len(slots)


def test_rates_land_on_every_module(case):
    model, _, depth = case
    prepare_drop_path(model)
    set_dropout(model, 0.25)
    rates = set_drop_path(model, 0.3)
    assert rates == pytest.approx([0.3 * i / (depth - 1) for i in range(depth)])
    assert rates[0] == 0.0 and rates[-1] == 0.3
    now = current_rates(model)
    assert now["drop_path"] == pytest.approx(rates)
    assert set(now["drop_path_modules"].values()) <= set(rates)
    assert now["dropout"].pop("head_drop") == 0.0  # no classifier-head dropout, as in the reference
    assert now["dropout"] and all(p == 0.25 for p in now["dropout"].values())
    names = set(now["dropout"])
    if depth == 4:  # ViT: every location, attention included
        for name in ("pos_drop", "blocks.0.attn.attn_drop", "blocks.0.attn.proj_drop", "blocks.3.mlp.drop1",
                     "blocks.3.mlp.drop2"):
            assert name in names
        assert model.blocks[2].drop_path1.drop_prob == model.blocks[2].drop_path2.drop_prob == pytest.approx(0.2)
    else:
        assert {"blocks.0.mlp_tokens.drop1", "blocks.2.mlp_channels.drop2"} <= names
    for m in model.modules():
        if isinstance(m, nn.Dropout) and m is not model.head_drop:
            assert m.p == 0.25


def test_rate_zero_is_identity_and_nonzero_drops(case):
    model, x, _ = case
    prepare_drop_path(model)
    ref = _forward(model, x, train=False)
    assert torch.equal(_forward(model, x, train=True), ref)
    set_dropout(model, 0.3)
    set_drop_path(model, 0.3)
    a, b = _forward(model, x, True, seed=1), _forward(model, x, True, seed=2)
    assert not torch.allclose(a, b) and not torch.allclose(a, ref)
    assert torch.equal(_forward(model, x, train=False), ref)
    set_dropout(model, 0.0)
    set_drop_path(model, 0.0)
    assert torch.equal(_forward(model, x, train=True), ref)


def test_drop_path_alone_drops_in_a_model_built_at_zero():
    torch.manual_seed(0)
    model, x = tiny_vit(), torch.randn(8, 3, 32, 32)
    ref = _forward(model, x, False)
    set_drop_path(model, 0.5)  # prepares on its own
    assert all(p == 0.0 for p in current_rates(model)["dropout"].values())
    outs = [_forward(model, x, True, seed=s) for s in range(3)]
    assert any(not torch.allclose(o, ref) for o in outs)


@pytest.mark.parametrize("fused", [True, False])
def test_attention_dropout_reaches_both_attention_paths(fused):
    torch.manual_seed(0)
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    assert attns and all(a.fused_attn for a in attns)  # timm 1.0.31 default on torch 2.x
    for a in attns:
        a.fused_attn = fused
    ref = _forward(model, x, False)
    n = set_dropout(model, 0.9, include=lambda name: name.endswith("attn_drop"))
    assert n == len(attns)
    others = {k: v for k, v in current_rates(model)["dropout"].items() if not k.endswith("attn_drop")}
    assert others and all(v == 0.0 for v in others.values())
    a, b = _forward(model, x, True, seed=1), _forward(model, x, True, seed=2)
    assert not torch.allclose(a, ref) and not torch.allclose(a, b)


def test_float_copy_of_attention_dropout_is_kept_in_step():
    """DiffAttention feeds a float ``attn_drop_p`` to SDPA instead of ``attn_drop.p``."""
    torch.manual_seed(0)
    model, x = tiny_vit(attn_layer="diff"), torch.randn(2, 3, 32, 32)
    ref = _forward(model, x, False)
    set_dropout(model, 0.9, include=lambda name: "attn_drop" in name)
    attrs = current_rates(model)["dropout_attrs"]
    assert attrs["blocks.0.attn.attn_drop_p"] == 0.9 and model.blocks[0].attn.attn_drop.p == 0.9
    assert not torch.allclose(_forward(model, x, True, seed=1), ref)


def test_generic_module_and_wrapper():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.drop = nn.Dropout2d(0.0)
            self.drop_path = nn.Identity()

        def forward(self, x):
            return x + self.drop_path(self.drop(self.fc(x)))

    net = nn.Sequential(Res(), Res(), Res())
    wrapper = nn.Module()
    wrapper.module = net
    assert prepare_drop_path(wrapper) == 3
    assert set_drop_path(wrapper, 0.4) == pytest.approx([0.0, 0.2, 0.4])
    assert set_dropout(wrapper, 0.1) == 3
    assert all(isinstance(r.drop_path, DropPath) for r in net)
    assert [r.drop.p for r in net] == [0.1] * 3
    with pytest.raises(ValueError):
        set_dropout(net, 1.0)
    single = nn.Sequential(Res())
    assert set_drop_path(single, 0.3) == [0.3]
