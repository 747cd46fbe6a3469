"""ImageNet input pipeline for the ViT / MLP-Mixer recipes: transforms, splits (folder, WebDataset, synthetic),
samplers and per-rank loaders. This package root only gathers the names its modules define; it holds no code."""

from .folder import FolderSplit
from .loading import Batch, EpochLoader, SkipCollate, cpus_per_rank, default_workers, eval_loader, train_loader
from .samplers import BlockSampler, RankSampler, SampleKey
from .shards import WdsSplit, count_wds_samples
from .splits import open_split
from .synthetic import SyntheticSplit
from .transforms import IMAGENET_MEAN, IMAGENET_STD, DeviceNormalize, build_erasing, build_transforms

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "Batch", "BlockSampler", "DeviceNormalize", "EpochLoader", "FolderSplit",
    "RankSampler", "SampleKey", "SkipCollate", "SyntheticSplit", "WdsSplit", "build_erasing", "build_transforms",
    "count_wds_samples", "cpus_per_rank", "default_workers", "eval_loader", "open_split", "train_loader",
]
