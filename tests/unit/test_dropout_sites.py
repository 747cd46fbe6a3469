"""The dropout schedule's sites on the real timm ViT-T and Mixer-S against the reference's (facebookresearch/dropout):
attention, projection, both MLP dropouts, position dropout (ViT), stochastic depth in every block linear over
depth, and no classifier-head dropout. The per-step path (cached :class:`DropSites`) must set what the full walk
sets."""

import copy

import pytest
import timm
import torch
from timm.layers import DropPath
from torch import nn

from recipes.imagenet.drop_sites import DropSites, current_rates, is_head, set_drop_path, set_dropout


def vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=3)


def mixer():
    return timm.create_model("mixer_s16_224", pretrained=False, img_size=32, num_classes=3)


def vit_sites(depth):
    """The reference ViT: pos_drop; per block attn_drop, proj_drop and the MLP's dropout after fc1 and fc2."""
    per_block = ("attn.attn_drop", "attn.proj_drop", "mlp.drop1", "mlp.drop2")
    return {"pos_drop"} | {f"blocks.{i}.{s}" for i in range(depth) for s in per_block}


def mixer_sites(depth):
    per_block = ("mlp_tokens.drop1", "mlp_tokens.drop2", "mlp_channels.drop1", "mlp_channels.drop2")
    return {f"blocks.{i}.{s}" for i in range(depth) for s in per_block}


CASES = {"vit": (vit, vit_sites, ("drop_path1", "drop_path2")), "mixer": (mixer, mixer_sites, ("drop_path",))}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    build, sites, paths = CASES[request.param]
    torch.manual_seed(0)
    model = build()
    return model, sites(len(model.blocks)), paths


def test_the_schedule_sets_exactly_the_reference_sites(case):
    model, expected, _ = case
    model = copy.deepcopy(model)
    before = current_rates(model)["dropout"]
    assert set(before) == expected | {"head_drop"} and set(before.values()) == {0.0}  # timm's full list
    assert set(DropSites.of(model).dropouts) == expected
    assert set_dropout(model, 0.25) == len(expected)
    after = current_rates(model)
    assert {k for k, p in after["dropout"].items() if p == 0.25} == expected
    assert after["dropout"]["head_drop"] == 0.0 and model.head_drop.p == 0.0
    assert after["dropout_attrs"] == {}  # timm 1.0 ViT / Mixer keep no float copy of a rate


def test_drop_path_in_every_block_linear_over_depth(case):
    model, _, slots = case
    model = copy.deepcopy(model)
    rates = set_drop_path(model, 0.3)
    n = len(model.blocks)
    assert rates == pytest.approx([0.3 * i / (n - 1) for i in range(n)])
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    for i, block in enumerate(model.blocks):
        for slot in slots:
            path = getattr(block, slot)
            assert isinstance(path, DropPath) and path.drop_prob == pytest.approx(0.3 * i / (n - 1)), (i, slot)
    paths = current_rates(model)["drop_path_modules"]
    assert set(paths) == {f"blocks.{i}.{s}" for i in range(n) for s in slots}


@pytest.mark.parametrize("attn_layer", [None, "diff"])
def test_cached_sites_set_what_the_full_walk_sets(attn_layer):
    """DiffAttention's float ``attn_drop_p`` copy too: the cache holds float attributes as well as modules."""
    torch.manual_seed(0)
    kw = {"attn_layer": attn_layer} if attn_layer else {}
    walked = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=3, depth=4, **kw)
    cached = copy.deepcopy(walked)
    sites = DropSites.of(cached)  # once, as the recipe does
    if attn_layer:
        assert "blocks.0.attn.attn_drop_p" in sites.rate_attrs
    for dropout, drop_path in [(0.1, 0.0), (0.05, 0.2), (0.0, 0.4), (0.3, 0.3), (0.0, 0.0)]:
        assert sites.set_dropout(dropout) == set_dropout(walked, dropout)
        assert sites.set_drop_path(drop_path) == set_drop_path(walked, drop_path)
        assert current_rates(cached) == current_rates(walked)
        assert set(sites.dropout_rates().values()) == {dropout}
        assert sites.drop_path_rates() == current_rates(walked)["drop_path"]


def test_head_sites():
    assert is_head("head_drop") and is_head("head.drop") and is_head("drop_rate")
    assert not is_head("blocks.0.mlp.drop1") and not is_head("features.denselayer1.drop_rate")
    assert not is_head("pos_drop") and not is_head("header.drop")

    class Net(nn.Module):  # a CNN-style head: F.dropout(x, self.drop_rate) before the classifier
        def __init__(self):
            super().__init__()
            self.drop_rate = 0.0
            self.body = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0))
            self.head = nn.Sequential(nn.Dropout(0.0), nn.Linear(2, 2))

    net = Net()
    assert set_dropout(net, 0.2) == 1
    assert net.body[1].p == 0.2 and net.head[0].p == 0.0 and net.drop_rate == 0.0
