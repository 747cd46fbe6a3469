"""Image transforms: timm's DeiT-style train and eval pipelines, the Pillow posterize shim they need, and a
transform applied under a sample's seed. It opens no dataset and decides no sample order or seed."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import get_worker_info

from trainer.errors import DataError
from trainer.rng import preserved_host_rng, seed_host_rng

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_transforms(
    image_size: int,
    train: bool,
    *,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    reprob: float = 0.25,
    remode: str = "pixel",
    interpolation: str = "bicubic",
    crop_pct: float = 0.875,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    color_jitter: float | None = 0.4,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[Image.Image], torch.Tensor]:
    """DeiT-style timm transforms, PIL RGB image -> normalized (3, image_size, image_size) float tensor.

    Train: RandomResizedCrop(scale), horizontal flip, RandAugment (``auto_augment``; timm turns colour jitter
    off while it is on), random erasing with probability ``reprob``. Eval: resize the short side to
    ``floor(image_size / crop_pct)``, then centre-crop ``image_size``.
    """
    from timm.data import create_transform

    if image_size < 1:
        raise DataError(f"image size {image_size} is not positive; set the image size to e.g. 224")
    _patch_timm_posterize()
    try:
        if train:
            return create_transform(
                image_size, is_training=True, scale=tuple(scale), hflip=hflip, color_jitter=color_jitter,
                auto_augment=auto_augment or None, interpolation=interpolation, mean=tuple(mean), std=tuple(std),
                re_prob=reprob, re_mode=remode, re_count=1)
        return create_transform(image_size, is_training=False, interpolation=interpolation, crop_pct=crop_pct,
                                mean=tuple(mean), std=tuple(std))
    except (AssertionError, KeyError, ValueError) as e:
        raise DataError(f"bad augmentation settings (auto_augment={auto_augment!r}, interpolation="
                        f"{interpolation!r}, remode={remode!r}): {e or type(e).__name__}; use timm's spellings, "
                        "e.g. 'rand-m9-mstd0.5-inc1', 'bicubic', 'pixel'") from None


def _posterize_keeping_zero_bits(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize with Pillow >= 11's bits range: keeping 0 bits gives black, as Pillow used to.

    RandAugment 'inc1' at magnitude 10 (reached by m9 with mstd0.5 noise) asks for 0 bits; current Pillow
    rejects that with a ValueError, which would kill a loader worker mid-epoch.
    """
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1:
        return img.point(lambda _v: 0)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_timm_posterize() -> None:
    from timm.data import auto_augment

    for name, op in auto_augment.NAME_TO_OP.items():
        if getattr(op, "__name__", "") == "posterize":
            auto_augment.NAME_TO_OP[name] = _posterize_keeping_zero_bits


def probe_shape(transform: Callable) -> tuple[int, ...]:
    """The transform's output shape, so that a batch of only bad images is still a well-formed empty tensor.

    The probe leaves every global random stream as it found it, so opening a split never shifts a seeded run.
    """
    with preserved_host_rng():
        out = transform(Image.new("RGB", (64, 64), (124, 116, 104)))
    if not isinstance(out, torch.Tensor):
        raise DataError(f"the image transform returned {type(out).__name__}, not a tensor; "
                        "build it with build_transforms")
    return tuple(out.shape)


def augment(transform: Callable, image: Image.Image, seed: int | None) -> torch.Tensor:
    """``transform(image)``, its random draws seeded by ``seed`` when one is given (training samples).

    Augmentation is replayed exactly: before a training sample is transformed, python's, numpy's and torch's
    CPU streams are seeded from (seed, epoch, the sample: its index for ``folder``; for ``wds`` its shard file
    name, key and pass over the shards), so a sample's crop, flip, RandAugment and erasing do not depend on which
    worker transforms it, how many workers there are, or whether the epoch was resumed. Seeding costs ~45 us a sample, ~0.5% of decoding and
    transforming a 500x375 JPEG to 224 px (~9 ms on one core); without workers, putting the training process's
    own streams back adds ~0.2 ms. Evaluation samples are not seeded (their transform draws nothing).

    A loader worker's streams serve only its transforms; in the training process itself (no workers) they are
    also dropout's and mixup's, so they are put back afterwards.
    """
    if seed is None:
        return transform(image)
    with preserved_host_rng() if get_worker_info() is None else nullcontext():
        seed_host_rng(seed)
        return transform(image)
