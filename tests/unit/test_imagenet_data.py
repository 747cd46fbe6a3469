"""The ImageNet input pipeline on tiny generated ImageFolder trees and WebDataset shards (CPU, seconds)."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.images import CLASSES, COLOURS, CORRUPT, jpeg_bytes, picture, write_shards
from recipes.imagenet.data import (
    BlockSampler, DeviceNormalize, SampleKey, SkipCollate, SyntheticSplit, build_erasing, build_transforms,
    count_wds_samples, cpus_per_rank, default_workers, eval_loader, open_split, train_loader,
)
from trainer.distributed import DistContext
from trainer.errors import DataError
from trainer.rng import capture_rng

N_TRAIN, N_VAL = 12, 4
BAD = ("corrupt.JPEG", "truncated.JPEG")
CPU = torch.device("cpu")


def ctx(rank: int = 0, world: int = 1) -> DistContext:
    return DistContext(rank=rank, world=world, local_rank=rank, device=CPU)


@pytest.fixture(scope="module")
def tf():
    return build_transforms(32, train=False)  # deterministic, so loaded batches can be compared


@pytest.fixture(scope="module")
def augment():
    return build_transforms(32, train=True)  # random crop, flip, RandAugment and erasing


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                image = picture(COLOURS[name], 1000 * c + i)
                if i % 2:
                    (d / f"{name}_{i:02d}.JPEG").write_bytes(jpeg_bytes(image))
                else:
                    image.save(d / f"{name}_{i:02d}.png")
    bad_dir = root / "train" / "apple"
    (bad_dir / BAD[0]).write_bytes(np.random.default_rng(1).bytes(3000))
    whole = jpeg_bytes(picture((90, 90, 90), 7))
    (bad_dir / BAD[1]).write_bytes(whole[:len(whole) * 6 // 10])
    return root


def one_line_data_error(fn, *needles: str) -> str:
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg
    return msg


def run_epoch(loader) -> list[tuple[list[int], int]]:
    return [(b.labels.tolist(), b.skipped) for b in loader]


# ------------------------------------------------------------------------------------------- folder


def test_class_mapping_and_subset_check(tree, tf, tmp_path):
    train = open_split(tree, "train", tf)
    val = open_split(tree, "val", tf)
    assert train.classes == val.classes == sorted(CLASSES)
    assert len(train) == 3 * N_TRAIN + len(BAD) and len(val) == 3 * N_VAL
    for ds in (train, val):
        for i in range(len(ds)):
            assert ds.path(i).parent.name == ds.classes[ds.targets[i]]
    # labels follow the colour, i.e. the class directory, through decoding
    img, label = val[0]
    assert val.classes[label] == "apple" and img.shape == (3, 32, 32)

    (tmp_path / "train" / "a").mkdir(parents=True)
    picture((1, 2, 3), 0).save(tmp_path / "train" / "a" / "x.png")
    (tmp_path / "val" / "b").mkdir(parents=True)
    picture((1, 2, 3), 0).save(tmp_path / "val" / "b" / "y.png")
    one_line_data_error(lambda: open_split(tmp_path, "val", tf), "b", str(tmp_path / "train"))


def test_transforms_at_32px():
    for train in (True, False):
        t = build_transforms(32, train)
        for size in ((40, 40), (300, 200), (20, 50)):
            out = t(picture((120, 60, 30), 0).resize(size))
            assert out.shape == (3, 32, 32) and out.dtype == torch.uint8  # workers send uint8
    one_line_data_error(lambda: build_transforms(32, True, auto_augment="nonsense"), "nonsense")


def test_bad_files_return_none_and_collate_counts(tree, tf, caplog):
    train = open_split(tree, "train", tf)
    bad = [i for i in range(len(train)) if train.path(i).name in BAD]
    assert len(bad) == 2
    with caplog.at_level(logging.WARNING, logger="recipes.imagenet.data"):
        assert [train[i] for i in bad] == [None, None]
    warnings = [r for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(warnings) == 1 and str(train.path(bad[0])) in warnings[0].getMessage()  # first bad file only
    empty = SkipCollate(train.image_shape)([None, None])
    assert empty.images.shape == (0, 3, 32, 32) and empty.labels.shape == (0,) and empty.skipped == 2
    assert empty.images.dtype == torch.uint8


@pytest.mark.parametrize("workers", [0, 2])
def test_epoch_skips_and_counts_bad_files(tree, tf, workers):
    train = open_split(tree, "train", tf)
    loader = train_loader(train, ctx(), 5, workers=workers, seed=3, drop_last=False)
    for epoch in (0, 1):  # twice: the persistent workers must serve the second epoch too
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader) == 8
        assert sum(b.skipped for b in batches) == len(BAD)
        assert sum(len(b.labels) for b in batches) == 3 * N_TRAIN
        assert all(len(b.images) == len(b.labels) for b in batches)
    assert loader.skipped == 2 * len(BAD)


def test_train_sharding_two_ranks(tree, tf):
    train = open_split(tree, "train", tf)

    def order(rank, epoch, seed=11):
        return train_loader(train, ctx(rank, 2), 4, workers=0, seed=seed, epoch=epoch).loader.sampler.indices()

    for epoch in (0, 1):
        r0, r1 = order(0, epoch), order(1, epoch)
        assert len(r0) == len(r1) == len(train) // 2
        assert not set(r0) & set(r1) and set(r0) | set(r1) == set(range(len(train)))
    assert order(0, 0) != order(0, 1)  # reshuffled every epoch
    assert order(0, 1) == order(0, 1) and order(0, 1) != order(0, 1, seed=12)  # a function of seed and epoch

    loader = train_loader(train, ctx(1, 2), 4, workers=0, seed=11, epoch=1)
    assert len(loader) == (len(train) // 2) // 4
    got = [label for labels, _ in run_epoch(loader) for label in labels]
    want = [int(train.targets[i]) for i in order(1, 1)[:len(loader) * 4] if train.path(i).name not in BAD]
    assert got == want


def test_start_batch_resumes_the_same_epoch(tree, tf):
    train = open_split(tree, "train", tf)
    full = train_loader(train, ctx(), 4, workers=0, seed=5, epoch=2)
    batches = list(full)
    assert len(batches) == 9
    resumed = train_loader(train, ctx(), 4, workers=0, seed=5, epoch=2, start_batch=3)
    assert len(resumed) == 6
    rest = list(resumed)
    assert [(b.labels.tolist(), b.skipped) for b in rest] == [(b.labels.tolist(), b.skipped) for b in batches[3:]]
    assert all(torch.equal(a.images, b.images) for a, b in zip(rest, batches[3:]))
    full.set_epoch(2, start_batch=9)
    assert list(full) == []
    one_line_data_error(lambda: full.set_epoch(2, start_batch=10), "10")


def same_streams(a: dict, b: dict) -> bool:
    return (a["python"] == b["python"] and np.array_equal(a["numpy"][1], b["numpy"][1])
            and a["numpy"][2:] == b["numpy"][2:] and torch.equal(a["torch"], b["torch"]))


def test_augmentation_replays_whatever_the_workers_and_the_resume(tree, augment):
    train = open_split(tree, "train", augment)
    before = capture_rng()
    full = list(train_loader(train, ctx(), 4, workers=0, seed=5, epoch=2))
    assert same_streams(before, capture_rng())  # loading in the training process leaves dropout's streams alone
    resumed = list(train_loader(train, ctx(), 4, workers=2, seed=5, epoch=2, start_batch=3))
    assert len(resumed) == len(full) - 3
    assert all(torch.equal(a.images, b.images) for a, b in zip(resumed, full[3:]))

    i = next(i for i in range(len(train)) if train[i] is not None)
    assert torch.equal(train[SampleKey(i, 5, 2)][0], train[SampleKey(i, 5, 2)][0])
    assert not torch.equal(train[SampleKey(i, 5, 2)][0], train[SampleKey(i, 5, 3)][0])  # new draws each epoch
    assert not torch.equal(train[i][0], train[i][0])  # a plain index (evaluation) is not seeded


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_covers_every_image_exactly_once(tree, tf, world):
    val = open_split(tree, "val", tf)
    seen = [i for r in range(world) for i in BlockSampler(len(val), r, world)]
    assert sorted(seen) == list(range(len(val)))
    labels = []
    for r in range(world):
        loader = eval_loader(val, ctx(r, world), 5, workers=2 if world == 2 else 0)
        batches = run_epoch(loader)
        assert len(batches) == len(loader)
        labels += [label for ls, _ in batches for label in ls]
    assert sorted(labels) == sorted(val.targets.tolist())


def test_missing_or_empty_dirs_are_one_line_errors(tree, tf, tmp_path):
    one_line_data_error(lambda: open_split(tmp_path / "nope", "train", tf), str(tmp_path / "nope"), "<class>")
    one_line_data_error(lambda: open_split(tree, "test", tf), str(tree / "test"))
    (tmp_path / "train" / "a").mkdir(parents=True)
    one_line_data_error(lambda: open_split(tmp_path, "train", tf), "no images", str(tmp_path / "train"))
    one_line_data_error(lambda: open_split(tmp_path / "nope", "train", tf, format="wds"), str(tmp_path / "nope"))
    one_line_data_error(lambda: open_split(tmp_path, "train", tf, format="wds"), "shards", "train-*.tar")
    one_line_data_error(lambda: open_split(tmp_path, "train", tf, format="wds", shards="s-{0..3}.tar"),
                        "missing", str(tmp_path / "s-0.tar"))
    one_line_data_error(lambda: open_split(tree, "train", tf, format="lmdb"), "lmdb")


# ------------------------------------------------------------------------------------------- webdataset

@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wds")
    write_shards(root, "train", 4, 6, corrupt=CORRUPT)
    write_shards(root, "val", 3, 5)
    return root


def test_wds_train_two_ranks_disjoint_and_reshuffled(shards, tf):
    train = open_split(shards, "train", tf, format="wds", shards="train-{000000..000003}.tar", samples=24)
    assert count_wds_samples(train.urls) == 24

    def epoch(rank, e, seed=0):
        loader = train_loader(train, ctx(rank, 2), 2, workers=0, seed=seed, epoch=e)
        assert len(loader) == 6
        return run_epoch(loader)

    for e in (0, 1):
        per_rank = [epoch(r, e) for r in (0, 1)]
        labels = [[x for ls, _ in batches for x in ls] for batches in per_rank]
        assert sum(s for batches in per_rank for _, s in batches) == 1  # the corrupt sample, skipped
        assert not set(labels[0]) & set(labels[1])
        assert set(labels[0]) | set(labels[1]) == set(range(24)) - {CORRUPT}
        assert not {x // 6 for x in labels[0]} & {x // 6 for x in labels[1]}  # whole shards per rank
    assert epoch(0, 0) != epoch(0, 1) and epoch(0, 1) == epoch(0, 1) and epoch(0, 1) != epoch(0, 1, seed=9)


def test_wds_uneven_shards_give_every_rank_the_same_batches(shards, tf):
    train = open_split(shards, "train", tf, format="wds", samples=24)
    # 4 shards over 3 ranks x 2 workers: ranks get 2, 1, 1 shards, and workers split a rank's samples.
    per_rank = [run_epoch(train_loader(train, ctx(r, 3), 2, workers=2, seed=1)) for r in range(3)]
    assert [len(batches) for batches in per_rank] == [4, 4, 4]
    assert all(len(ls) + s == 2 for batches in per_rank for ls, s in batches)
    owned = [{x // 6 for ls, _ in batches for x in ls} for batches in per_rank]
    assert sum(len(o) for o in owned) == len(set().union(*owned))  # no shard is read by two ranks


@pytest.fixture
def machine(monkeypatch):
    """A 256-core host (os.cpu_count) whose affinity mask gives this process 24 of them, outside Slurm."""
    monkeypatch.setattr("os.cpu_count", lambda: 256)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(24)))
    for var in ("SLURM_CPUS_PER_TASK", "SLURM_NTASKS", "LOCAL_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "8")
    return monkeypatch


@pytest.mark.parametrize("env, cpus", [
    ({"LOCAL_WORLD_SIZE": "1"}, 24),  # the affinity mask, not the machine's 256
    ({"LOCAL_WORLD_SIZE": "4"}, 6),  # shared by a launcher's ranks on the host
    ({"LOCAL_WORLD_SIZE": "4", "SLURM_CPUS_PER_TASK": "10", "SLURM_NTASKS": "8"}, 10),  # a Slurm task per rank
    ({"LOCAL_WORLD_SIZE": "4", "SLURM_CPUS_PER_TASK": "16", "SLURM_NTASKS": "2"}, 4),  # 4 ranks in each task
    ({"LOCAL_WORLD_SIZE": "2", "SLURM_CPUS_PER_TASK": "12"}, 6),  # no task count: the host's ranks share
    ({"LOCAL_WORLD_SIZE": "48"}, 1),  # never 0
])
def test_worker_count_follows_the_cpus_this_rank_may_use(machine, env, cpus):
    for var, value in env.items():
        machine.setenv(var, value)
    assert cpus_per_rank() == cpus
    assert default_workers() == max(1, cpus - 1)  # one CPU for the training process itself


def test_loader_settings(tree, tf):
    train = open_split(tree, "train", tf)
    dl = train_loader(train, ctx(), 4, workers=2).loader
    assert dl.persistent_workers and dl.prefetch_factor == 2 and not dl.pin_memory
    assert not train_loader(train, ctx(), 4, workers=0).loader.persistent_workers


@pytest.mark.parametrize("workers", [0, 2])
def test_loaders_send_uint8_batches(tree, tf, augment, shards, workers):
    loaders = [train_loader(open_split(tree, "train", augment), ctx(), 5, workers=workers),
               eval_loader(open_split(tree, "val", tf), ctx(), 5, workers=workers),
               train_loader(open_split(shards, "train", augment, format="wds", samples=24), ctx(), 4, workers=workers),
               train_loader(SyntheticSplit(12, 32, 3), ctx(), 4, workers=workers)]
    for loader in loaders:
        batches = list(loader)
        assert batches and all(b.images.dtype == torch.uint8 and b.images.shape[1:] == (3, 32, 32) for b in batches)
        rate = loader.take_rate()  # images per second waited for them
        assert rate is not None and rate > 0
        assert loader.take_rate() is None  # reset: nothing delivered since


def test_a_float_transform_is_refused(tree):
    from timm.data import create_transform

    one_line_data_error(lambda: open_split(tree, "val", create_transform(32)), "torch.float32", "uint8")


def test_device_normalization_matches_torchvision_float_path():
    """The loaders' uint8 batch normalized on the device equals timm's / torchvision's ToTensor + Normalize."""
    from timm.data import create_transform

    images = [picture((200, 30, 30), 1), picture((10, 90, 240), 2).resize((57, 41)), picture((128, 128, 128), 3)]
    float_tf = create_transform(32, is_training=False, crop_pct=0.875, interpolation="bicubic")  # ToTensor, Normalize
    want = torch.stack([float_tf(im) for im in images])
    got = DeviceNormalize(CPU)(torch.stack([build_transforms(32, False)(im) for im in images]))
    assert got.dtype == torch.float32 and got.shape == want.shape == (3, 3, 32, 32)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    with pytest.raises(TypeError):
        DeviceNormalize(CPU)(want)


def test_random_erasing_works_on_normalized_batches():
    assert build_erasing(0.0, CPU) is None
    torch.manual_seed(0)
    batch = torch.full((4, 3, 32, 32), 7.0)  # a value no N(0, 1) draw comes near
    out = build_erasing(1.0, CPU)(batch.clone())
    erased = out != 7.0
    assert all(0 < int(e.sum()) < e.numel() for e in erased)  # one box in every image, not the whole image
    assert out[erased].abs().max() < 7.0 and abs(float(out[erased].std()) - 1.0) < 0.2  # per-pixel normal noise
    one_line_data_error(lambda: build_erasing(0.5, CPU, remode="sparkle"), "sparkle")


def test_wds_resume_with_workers(shards, tf):
    train = open_split(shards, "train", tf, format="wds", samples=24)  # default discovery: root/train-*.tar
    assert len(train.urls) == 4
    full = train_loader(train, ctx(), 2, workers=2, seed=4, epoch=3, shuffle_buffer=5)
    batches = run_epoch(full)
    assert len(batches) == len(full) == 12 and sum(s for _, s in batches) == 1
    assert sorted(x for ls, _ in batches for x in ls) == sorted(set(range(24)) - {CORRUPT})
    for k in (3, 4):  # resume on either worker's turn
        full.set_epoch(3, start_batch=k)
        assert run_epoch(full) == batches[k:]


def test_wds_augmentation_follows_the_sample_not_the_worker(shards, augment):
    train = open_split(shards, "train", augment, format="wds", samples=24)

    def by_label(workers, epoch=1, start_batch=0):  # a sample's label is its index
        loader = train_loader(train, ctx(), 2, workers=workers, seed=4, epoch=epoch, start_batch=start_batch,
                              shuffle_buffer=5)
        return {int(y): x for b in loader for x, y in zip(b.images, b.labels)}

    one, two = by_label(1), by_label(2)
    assert one.keys() == two.keys() == set(range(24)) - {CORRUPT}
    assert all(torch.equal(one[k], two[k]) for k in one)
    resumed = by_label(2, start_batch=3)
    assert len(resumed) >= 5 and all(torch.equal(resumed[k], two[k]) for k in resumed)
    other = by_label(2, epoch=2)
    assert all(not torch.equal(other[k], two[k]) for k in other)  # new draws each epoch


def test_wds_eval_covers_every_sample_exactly_once(shards, tf):
    val = open_split(shards, "val", tf, format="wds", shards="val-{000000..000002}.tar")
    for world, workers in ((1, 0), (2, 0), (3, 2)):
        labels = []
        for r in range(world):
            labels += [x for ls, _ in run_epoch(eval_loader(val, ctx(r, world), 4, workers=workers)) for x in ls]
        assert sorted(labels) == list(range(15)), (world, workers)


def test_randaugment_posterize_at_full_magnitude_gives_black_instead_of_crashing():
    """'rand-m9-mstd0.5-inc1' reaches magnitude 10, where timm asks Pillow to keep 0 bits (a ValueError now)."""
    from timm.data.auto_augment import AugmentOp

    build_transforms(32, train=True)  # installs the shim
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    assert AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)(image).getpixel((0, 0)) == (0, 0, 0)
    assert AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=5)(image).getpixel((0, 0)) == (192, 64, 0)
