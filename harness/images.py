"""Generated images: small class-coloured ImageFolder trees and WebDataset shards that a model learns in an epoch,
and photo-like pictures that cost what ImageNet's cost to decode."""

from __future__ import annotations

import io
from pathlib import Path

IMAGE_COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40)]  # one class per colour


def make_image_folder(root: Path, size: int = 40, per_class: tuple[int, int] = (24, 8), corrupt: bool = False) -> Path:
    """Four classes of noisy solid colours under train/ and val/ (24 + 8 per class: 3 steps per epoch at global
    batch 32 on 1 or 2 ranks, learnable in an epoch or two); ``corrupt`` makes one of class_0's training images an
    undecodable train/class_0/broken.JPEG, in place of a good one: the count still divides into whole batches, so
    every epoch reads it, whatever the seeded order (an extra 97th image would be the one left out, now and then)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for c, colour in enumerate(IMAGE_COLOURS):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.integers(-50, 50, (size, size, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(d / f"{i:03d}.JPEG", quality=90)
    if corrupt:
        (root / "train" / "class_0" / f"{per_class[0] - 1:03d}.JPEG").unlink()
        (root / "train" / "class_0" / "broken.JPEG").write_bytes(rng.bytes(2000))
    return root


# WebDataset shards: three classes whose creation order differs from their sorted order, on purpose.
CLASSES = ["zebra", "apple", "mango"]
COLOURS = {"zebra": (200, 30, 30), "apple": (30, 200, 30), "mango": (30, 30, 200)}
CORRUPT = 14  # global index of the sample whose jpg is random bytes, in the shards tests write with corrupt=CORRUPT


def picture(colour, seed: int):
    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(seed).integers(0, 40, (40, 40, 3))
    return Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8))


def jpeg_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_shards(root: Path, prefix: str, shards: int, per_shard: int, corrupt: int | None = None) -> None:
    """``shards`` tar files of ``per_shard`` samples each; a sample's label is its global index, so batches show
    exactly which samples they hold."""
    import numpy as np
    import webdataset as wds

    for s in range(shards):
        with wds.TarWriter(str(root / f"{prefix}-{s:06d}.tar")) as sink:
            for k in range(per_shard):
                idx = s * per_shard + k
                data = (np.random.default_rng(idx).bytes(500) if idx == corrupt
                        else jpeg_bytes(picture(COLOURS[CLASSES[idx % 3]], idx)))
                sink.write({"__key__": f"s{idx:05d}", "jpg": data, "cls": idx})


def jpeg_like_photo(rng, width: int, height: int):
    """A PIL image that compresses like a photograph (smooth random colour field plus sensor-like noise: ~40-80 kB
    as a quality-90 JPEG at ImageNet's ~500x375), so decoding costs what ImageNet's does."""
    import numpy as np
    from PIL import Image

    coarse = rng.integers(0, 255, (height // 16 + 1, width // 16 + 1, 3)).astype(np.uint8)
    field = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    noise = rng.integers(-20, 20, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(field) + noise, 0, 255).astype(np.uint8))
