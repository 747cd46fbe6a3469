"""Image transforms: timm's DeiT-style train and eval pipelines up to a uint8 tensor (what loader workers send),
the float steps that follow them on the device (normalization, random erasing), the Pillow posterize shim they
need, and a transform applied under a sample's seed. It opens no dataset and decides no sample order or seed.

Workers send uint8 because a batch crosses shared memory ``workers x prefetch_factor`` times over: at the
paper's 128 images per rank and 224 px a float32 batch is 77 MB, a uint8 one 19 MB. Normalizing is an
elementwise pass the accelerator does in microseconds."""

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
    interpolation: str = "bicubic",
    crop_pct: float = 0.875,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    color_jitter: float | None = 0.4,
) -> Callable[[Image.Image], torch.Tensor]:
    """DeiT-style timm transforms, PIL RGB image -> (3, image_size, image_size) uint8 tensor, not normalized.

    Train: RandomResizedCrop(scale), horizontal flip, RandAugment (``auto_augment``; timm turns colour jitter
    off while it is on). Eval: resize the short side to ``floor(image_size / crop_pct)``, then centre-crop
    ``image_size``. :class:`DeviceNormalize` and, for training, :func:`build_erasing` follow on the device
    (timm's own ``use_prefetcher`` split: random erasing works on normalized values, so it comes after).
    """
    from timm.data import create_transform

    if image_size < 1:
        raise DataError(f"image size {image_size} is not positive; set the image size to e.g. 224")
    _patch_timm_posterize()
    try:
        if train:
            return create_transform(
                image_size, is_training=True, scale=tuple(scale), hflip=hflip, color_jitter=color_jitter,
                auto_augment=auto_augment or None, interpolation=interpolation, use_prefetcher=True)
        return create_transform(image_size, is_training=False, interpolation=interpolation, crop_pct=crop_pct,
                                use_prefetcher=True)
    except (AssertionError, KeyError, ValueError) as e:
        raise DataError(f"bad augmentation settings (auto_augment={auto_augment!r}, interpolation="
                        f"{interpolation!r}): {e or type(e).__name__}; use timm's spellings, "
                        "e.g. 'rand-m9-mstd0.5-inc1', 'bicubic'") from None


class DeviceNormalize:
    """uint8 (n, 3, H, W) batch -> float32 ``(x / 255 - mean) / std`` where the batch lies (after its copy to the
    device): torchvision's ToTensor + Normalize, the same operations in the same order."""

    def __init__(self, device: torch.device, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"DeviceNormalize takes the loaders' uint8 batches, not {images.dtype}")
        return images.float().div_(255.0).sub_(self.mean).div_(self.std)


def build_erasing(reprob: float, device: torch.device, remode: str = "pixel") -> Callable | None:
    """timm's random erasing (one box, probability ``reprob``) for normalized batches on ``device``; None when off.

    Its draws come from the training process's python and device streams, like mixup's and dropout's, which a
    checkpoint saves and a resume restores; they do not depend on the loader's workers.
    """
    if reprob <= 0:
        return None
    from timm.data.random_erasing import RandomErasing

    try:
        return RandomErasing(reprob, mode=remode, max_count=1, device=device)
    except AssertionError:
        raise DataError(f"unknown random erasing mode {remode!r}; use 'pixel', 'rand' or 'const'") from None


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

    The transform must give uint8 (what workers send; see the module docstring). The probe leaves every global
    random stream as it found it, so opening a split never shifts a seeded run.
    """
    with preserved_host_rng():
        out = transform(Image.new("RGB", (64, 64), (124, 116, 104)))
    if not isinstance(out, torch.Tensor) or out.dtype != torch.uint8:
        got = type(out).__name__ if not isinstance(out, torch.Tensor) else f"a {out.dtype} tensor"
        raise DataError(f"the image transform returned {got}, not a uint8 tensor; build it with build_transforms")
    return tuple(out.shape)


def augment(transform: Callable, image: Image.Image, seed: int | None) -> torch.Tensor:
    """``transform(image)``, its random draws seeded by ``seed`` when one is given (training samples).

    Augmentation is replayed exactly: before a training sample is transformed, python's, numpy's and torch's
    CPU streams are seeded from (seed, epoch, the sample: its index for ``folder``; for ``wds`` its shard file
    name, key and pass over the shards), so a sample's crop, flip and RandAugment do not depend on which
    worker transforms it, how many workers there are, or whether the epoch was resumed. What seeding costs in a
    loader worker, and without workers what putting the training process's own streams back adds, is measured
    by bench/decision_costs.py --case augment_seeding (BENCHMARKS.md). Evaluation samples are not seeded (their
    transform draws nothing).

    A loader worker's streams serve only its transforms; in the training process itself (no workers) they are
    also dropout's and mixup's, so they are put back afterwards.
    """
    if seed is None:
        return transform(image)
    with preserved_host_rng() if get_worker_info() is None else nullcontext():
        seed_host_rng(seed)
        return transform(image)
