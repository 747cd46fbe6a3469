"""Set dropout and stochastic-depth rates on a live model, for schedules that change them mid-run.

Covered (timm 1.0.x ViT ``VisionTransformer``, ``MlpMixer`` and any other ``nn.Module``):

* every ``nn.Dropout``/``Dropout1d/2d/3d``/``AlphaDropout``/``FeatureAlphaDropout`` module: in ViT
  ``pos_drop``, ``attn.attn_drop``, ``attn.proj_drop``, ``mlp.drop1``/``drop2`` and ``head_drop``;
  in Mixer ``mlp_tokens``/``mlp_channels`` ``drop1``/``drop2`` and ``head_drop``. timm builds these
  as ``nn.Dropout(0.0)`` even at rate 0, so no module swap is needed. The fused (SDPA) attention
  path reads ``self.attn_drop.p`` at every forward, so setting the module's ``p`` is enough;
* float copies that some timm code reads instead of the module: ``attn_drop_p`` (``DiffAttention``
  and ``DiffParallelScalingBlock`` feed it to SDPA) and ``drop_rate`` (CNN heads that call
  ``F.dropout(x, self.drop_rate)``; elsewhere it only feeds ``reset_classifier``, kept in step);
* timm ``DropPath`` in children named ``drop_path*``; timm builds them as ``nn.Identity`` at rate 0,
  which :func:`prepare_drop_path` swaps for ``DropPath(0.0)``.

Not covered: ``PatchDropout`` (``patch_drop``, token dropping, a different regulariser), DropBlock,
and dropout hidden in plain Python floats under other names.
"""

from __future__ import annotations

import sys
from typing import Callable

from torch import nn

_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_RATE_ATTRS = ("attn_drop_p", "drop_rate")


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


def set_drop_path(model: nn.Module, rate: float) -> list[float]:
    """Block ``i`` of ``n`` gets ``rate * i / (n - 1)``, the stochastic-depth rule of timm's ViT.

    Calls :func:`prepare_drop_path` first so no block is left as a rate-ignoring Identity. Mixer
    in timm builds every block at the same rate; this applies the linear rule there too, as the
    paper's code does. Returns the per-block rates.
    """
    rate = _check_rate(rate)
    prepare_drop_path(model)
    blocks = _drop_path_blocks(model)
    n = len(blocks)
    rates = [rate if n == 1 else rate * i / (n - 1) for i in range(n)]
    for block, r in zip(blocks, rates):
        for path in _block_paths(block):
            path.drop_prob = r
    return rates


def set_dropout(model: nn.Module, rate: float, include: Callable[[str], bool] | None = None) -> int:
    """Set every dropout rate in the model, attention dropout included.

    ``include`` filters by qualified name (``blocks.0.attn.attn_drop``, or ``...attn_drop_p`` /
    ``...drop_rate`` for float copies), e.g. to change attention dropout alone. Returns how many
    modules and float attributes were set.
    """
    rate = _check_rate(rate)
    count = 0
    for prefix, module in _bare(model).named_modules():
        if isinstance(module, _DROPOUTS) and (include is None or include(prefix)):
            module.p = rate
            count += 1
        for attr in _RATE_ATTRS:
            value = getattr(module, attr, None)
            qual = f"{prefix}.{attr}" if prefix else attr
            if _is_rate(value) and (include is None or include(qual)):
                setattr(module, attr, rate)
                count += 1
    return count


def current_rates(model: nn.Module) -> dict:
    """Rates in effect now: ``dropout`` (module name -> p), ``dropout_attrs`` (float copies),
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
