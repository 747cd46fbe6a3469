"""Set dropout and stochastic-depth rates on a live model, for schedules that change them mid-run.

Covered (timm 1.0.x ViT ``VisionTransformer``, ``MlpMixer`` and any other ``nn.Module``):

* every ``nn.Dropout``/``Dropout1d/2d/3d``/``AlphaDropout``/``FeatureAlphaDropout`` module outside the
  classifier head: in ViT ``pos_drop``, ``attn.attn_drop``, ``attn.proj_drop``, ``mlp.drop1``/``drop2``; in
  Mixer ``mlp_tokens``/``mlp_channels`` ``drop1``/``drop2`` -- the sites of the reference models
  (facebookresearch/dropout). timm builds these as ``nn.Dropout(0.0)`` even at rate 0, so no module swap is
  needed. The fused (SDPA) attention path reads ``self.attn_drop.p`` at every forward, so setting ``p`` is enough;
* float copies that some timm code reads instead of a module: ``attn_drop_p`` (``DiffAttention`` and
  ``DiffParallelScalingBlock`` feed it to SDPA) and a ``drop_rate`` inside the trunk (DenseNet's layers);
* timm ``DropPath`` in children named ``drop_path*``; timm builds them as ``nn.Identity`` at rate 0,
  which :func:`prepare_drop_path` swaps for ``DropPath(0.0)``.

Never set: classifier-head dropout (:func:`is_head`), which the reference models do not have (its ViT has no
head dropout at all); timm's ``head_drop`` stays at its build rate, 0 in the ImageNet recipe. Nor
``PatchDropout`` (``patch_drop``, token dropping, a different regulariser), DropBlock, and dropout hidden in plain
Python floats under other names.

:class:`DropSites` finds the targets once, so a per-step schedule assigns rates to fixed lists instead of
walking every module of the model each step.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

from torch import nn

_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_RATE_ATTRS = ("attn_drop_p", "drop_rate")
_HEADS = ("head", "head_drop")


def is_head(name: str) -> bool:
    """Whether a qualified dropout name (relative to the bare model) is classifier-head dropout.

    ``head_drop`` (timm ViT and Mixer, fed by ``create_model(drop_rate=...)``), anything inside ``head`` (timm's
    ``ClassifierHead``/``NormMlpClassifierHead`` ``head.drop``), and the model's own ``drop_rate`` float: in timm
    a model-level ``drop_rate`` is always the head's rate, either read as ``F.dropout(x, self.drop_rate)`` before
    the classifier (ResNet, EfficientNet, ...) or only handed to a new head by ``reset_classifier`` (ViT, Mixer).
    A ``drop_rate`` inside the trunk (e.g. DenseNet's layers) is in-block dropout and is not a head.
    """
    return name.split(".", 1)[0] in _HEADS or name == "drop_rate"


def _bare(model: nn.Module) -> nn.Module:
    """Look through DeepSpeed/DDP wrappers so ``blocks`` is found on the real model."""
    while not hasattr(model, "blocks") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _is_rate(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_rate(rate: float) -> float:
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop rate must be in [0, 1), got {rate}")
    return rate


def _drop_path_types() -> tuple[type, ...]:
    """timm's ``DropPath`` only once timm is loaded (no model can hold one before): the language-model recipes,
    which use these functions for their own dropouts, never pay timm's import (seconds per process)."""
    layers = sys.modules.get("timm.layers")
    return (nn.Identity, layers.DropPath) if layers is not None else (nn.Identity,)


def _drop_path_slots(module: nn.Module) -> list[str]:
    kinds = _drop_path_types()
    return [name for name, child in module.named_children()
            if name.startswith("drop_path") and isinstance(child, kinds)]


def _drop_path_blocks(model: nn.Module) -> list[nn.Module]:
    """Modules that share one depth position.

    ``model.blocks`` children when they hold every drop path (ViT, Mixer; also catches paths
    nested in ``ParallelThingsBlock``'s Sequentials); otherwise each owning module in order.
    """
    model = _bare(model)
    owners = [m for _, m in model.named_modules() if _drop_path_slots(m)]
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        inside = [b for b in blocks if any(_drop_path_slots(m) for m in b.modules())]
        covered = {id(m) for b in inside for m in b.modules()}
        if inside and all(id(o) in covered for o in owners):
            return inside
    return owners


def prepare_drop_path(model: nn.Module) -> int:
    """Swap ``nn.Identity`` drop paths (timm's choice at rate 0) for ``DropPath(0.0)``.

    An Identity cannot take a later rate, so a model built at rate 0 would silently ignore a
    schedule. Idempotent; returns the number of depth positions (blocks).
    """
    blocks = _drop_path_blocks(model)
    for block in blocks:
        for module in block.modules():
            for name in _drop_path_slots(module):
                if isinstance(getattr(module, name), nn.Identity):
                    from timm.layers import DropPath

                    setattr(module, name, DropPath(0.0))
    return len(blocks)


def _block_paths(block: nn.Module) -> list[nn.Module]:
    return [getattr(m, name) for m in block.modules() for name in _drop_path_slots(m)]


def _drop_path_groups(model: nn.Module) -> list[list[nn.Module]]:
    prepare_drop_path(model)
    return [_block_paths(b) for b in _drop_path_blocks(model)]


def _depth_rates(rate: float, n: int) -> list[float]:
    """Block ``i`` of ``n`` gets ``rate * i / (n - 1)``: timm's ViT and the reference's ``linspace(0, rate, n)``."""
    return [rate if n == 1 else rate * i / (n - 1) for i in range(n)]


@dataclass(frozen=True)
class DropSites:
    """Where the schedules' rates go, found by one walk of the model (:meth:`of`); setting a rate then only loops
    over these lists, which is what a per-step schedule should cost. Module references stay valid while the model
    lives: DeepSpeed, ``.to()`` and dtype casts keep the module objects."""

    dropouts: dict[str, nn.Module]  # qualified name -> dropout module (its ``p`` is set)
    rate_attrs: dict[str, tuple[nn.Module, str]]  # qualified name -> (owner, float attribute)
    drop_paths: list[list[nn.Module]]  # per depth position, that block's DropPath modules

    @classmethod
    def of(cls, model: nn.Module, include: Callable[[str], bool] | None = None) -> DropSites:
        """The model's dropout sites (head excluded, ``include`` filtering by qualified name) and its drop paths,
        Identity slots swapped for ``DropPath(0.0)`` first (:func:`prepare_drop_path`)."""
        return cls(*_dropout_targets(model, include), _drop_path_groups(model))

    def set_dropout(self, rate: float) -> int:
        rate = _check_rate(rate)
        for module in self.dropouts.values():
            module.p = rate
        for owner, attr in self.rate_attrs.values():
            setattr(owner, attr, rate)
        return len(self.dropouts) + len(self.rate_attrs)

    def set_drop_path(self, rate: float) -> list[float]:
        rates = _depth_rates(_check_rate(rate), len(self.drop_paths))
        for paths, r in zip(self.drop_paths, rates):
            for path in paths:
                path.drop_prob = r
        return rates

    def dropout_rates(self) -> dict[str, float]:
        """What the sites carry now, modules and float copies by qualified name."""
        return {**{k: float(m.p) for k, m in self.dropouts.items()},
                **{k: float(getattr(o, a)) for k, (o, a) in self.rate_attrs.items()}}

    def drop_path_rates(self) -> list[float]:
        """Per block, the largest drop probability in it."""
        return [max((float(p.drop_prob) for p in paths), default=0.0) for paths in self.drop_paths]


def _dropout_targets(model: nn.Module, include: Callable[[str], bool] | None
                     ) -> tuple[dict[str, nn.Module], dict[str, tuple[nn.Module, str]]]:
    def wanted(name: str) -> bool:
        return not is_head(name) and (include is None or include(name))

    modules, attrs = {}, {}
    for prefix, module in _bare(model).named_modules():
        if isinstance(module, _DROPOUTS) and wanted(prefix):
            modules[prefix] = module
        for attr in _RATE_ATTRS:
            qual = f"{prefix}.{attr}" if prefix else attr
            if _is_rate(getattr(module, attr, None)) and wanted(qual):
                attrs[qual] = (module, attr)
    return modules, attrs


def set_drop_path(model: nn.Module, rate: float) -> list[float]:
    """Block ``i`` of ``n`` gets ``rate * i / (n - 1)``, the stochastic-depth rule of timm's ViT.

    Prepares the model first so no block is left as a rate-ignoring Identity. Mixer in timm builds every block
    at the same rate; this applies the linear rule there too, as the paper's code does. Returns the per-block
    rates. One walk of the model per call; per-step callers keep a :class:`DropSites`.
    """
    return DropSites({}, {}, _drop_path_groups(model)).set_drop_path(rate)


def set_dropout(model: nn.Module, rate: float, include: Callable[[str], bool] | None = None) -> int:
    """Set every dropout rate in the model outside the classifier head (:func:`is_head`), attention included.

    ``include`` filters by qualified name (``blocks.0.attn.attn_drop``, or ``...attn_drop_p`` /
    ``...drop_rate`` for float copies), e.g. to change attention dropout alone. Returns how many
    modules and float attributes were set. One walk of the model per call; per-step callers keep a
    :class:`DropSites`.
    """
    return DropSites(*_dropout_targets(model, include), []).set_dropout(rate)


def current_rates(model: nn.Module) -> dict:
    """Rates in effect now, head included: ``dropout`` (module name -> p), ``dropout_attrs`` (float copies),
    ``drop_path`` (per block, the largest prob in it; Identity counts as 0) and
    ``drop_path_modules`` (module name -> prob)."""
    model = _bare(model)
    dropout, attrs, paths = {}, {}, {}
    for prefix, module in model.named_modules():
        if isinstance(module, _DROPOUTS):
            dropout[prefix] = float(module.p)
        for attr in _RATE_ATTRS:
            value = getattr(module, attr, None)
            if _is_rate(value):
                attrs[f"{prefix}.{attr}" if prefix else attr] = float(value)
        for name in _drop_path_slots(module):
            child = getattr(module, name)
            paths[f"{prefix}.{name}" if prefix else name] = float(getattr(child, "drop_prob", 0.0))
    per_block = [max((float(getattr(p, "drop_prob", 0.0)) for p in _block_paths(b)), default=0.0)
                 for b in _drop_path_blocks(model)]
    return {"dropout": dropout, "dropout_attrs": attrs, "drop_path": per_block, "drop_path_modules": paths}
