"""The ImageNet recipes end to end on a generated ImageFolder: 2-rank ViT and Mixer runs on CPU that learn,
log the scheduled drop rates and the loader's rate every step, evaluate exactly on 1 rank (and on 2 and 3 ranks
that do not divide the images), and resume mid-schedule; a 2-rank ViT trains from WebDataset shards and resumes
mid-epoch where its stream was."""

import json
import re
import shutil
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from harness.images import CORRUPT, write_shards
from harness.images import make_image_folder
from harness.launching import check, error_lines, free_port, launch, metric_value
from harness.run_dirs import cut
from trainer.checkpoint import read_client_state
from trainer.distributed import DistContext
from trainer.evaluation import evaluate_split
from trainer.registry import get_recipe

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images") / "imagenet", corrupt=True)


def common(root, epochs):
    return [f"data.root={root}", "data.batch_size=32", "data.image_size=32", "data.workers=1",
            f"train.epochs={epochs}", "train.log_every=1", "train.progress=false", "optim.lr=2e-3",
            "optim.lr_batch=32", "optim.warmup_epochs=1", "optim.min_lr=1e-5"]


VIT = ["model.kwargs={patch_size: 8, embed_dim: 48, depth: 3, num_heads: 3}"]


def records(run_dir, split):
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r["split"] == split and "source" not in r]


def scalars(run_dir, tag):
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.fixture(scope="module")
def vit_run(images, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("vit") / "run"
    check(launch("train.py", ["--recipe", "vit_t_early_dropout", "--run-dir", str(run_dir), "--set",
                              *common(images, 8), *VIT, "drop.dropout=0.3", "drop.cutoff_epoch=4"], ranks=2))
    return run_dir


def test_vit_early_dropout_learns(vit_run):
    valid = records(vit_run, "valid")
    assert [r["step"] for r in valid] == [3 * e for e in range(1, 9)]  # once per epoch
    assert valid[-1]["top1"] >= 60.0, valid[-1]  # chance is 25%
    assert valid[-1]["top5"] == 100.0  # 4 classes
    assert valid[-1]["loss"] < 0.9 * valid[0]["loss"]
    assert valid[-1]["skipped_train_images"] >= 1  # the broken file, counted over ranks instead of crashing
    assert (vit_run / "checkpoints" / "best").is_dir()


def test_early_dropout_falls_linearly_to_zero_at_the_cutoff(vit_run):
    # 3 steps per epoch, cutoff epoch 4: steps 0..11 go from 0.3 to 0 linearly, then 0. The tag holds the rate
    # read back from the live model's dropout modules before each optimizer step, under the step it leads to.
    dropout = scalars(vit_run, "drop/dropout")
    assert sorted(dropout) == list(range(1, 25))
    expected = [0.3 * (1 - s / 11) if s < 12 else 0.0 for s in range(24)]
    assert [dropout[s + 1] for s in range(24)] == pytest.approx(expected, abs=1e-6)
    assert set(scalars(vit_run, "drop/drop_path").values()) == {0.0}
    for tag in ("train/loss", "train/lr", "valid/loss", "valid/top1", "valid/top5", "perf/samples_per_s"):
        assert scalars(vit_run, tag), tag


def test_the_loaders_rate_is_logged_beside_the_models(vit_run):
    """Images per second the training loop waited on its loader (summed over ranks), at the model's cadence."""
    loader, model = scalars(vit_run, "perf/loader_samples_per_s"), scalars(vit_run, "perf/samples_per_s")
    assert sorted(loader) == sorted(model) == list(range(1, 25))  # train.log_every=1
    assert all(v > 0 for v in loader.values())


def test_one_rank_evaluation_matches_the_two_rank_log(vit_run):
    out = check(launch("evaluate.py", ["--run-dir", str(vit_run), "--checkpoint", "latest"]))
    assert metric_value(out, "top1") == pytest.approx(records(vit_run, "valid")[-1]["top1"], abs=1e-9)


# 10 classes for 4 colours: top-5 is a real count, not 100% by construction; a global evaluation batch of 4 gives
# per-rank batches of 4, 2 and 1 on 1, 2 and 3 ranks, and 13 images give blocks of 13, 6 + 7 and 4 + 4 + 5.
EVAL_SETS = ["data.batch_size=8", "data.eval_batch_size=4", "data.image_size=32", "data.workers=0",
             "model.num_classes=10", *VIT]


def evaluator(root, ctx):
    """The recipe as ``launch/evaluate.py`` builds it (no training plan), and its model."""
    spec = get_recipe("vit_t")
    recipe = spec.factory(spec.load_config([], [f"data.root={root}", *EVAL_SETS]), ctx)
    recipe.setup()
    return recipe, recipe.build_model()


def evaluate_as(rank, worlds, ports, root, weights) -> dict[int, dict]:
    """This process as rank ``rank`` of each world it belongs to, one gloo group at a time."""
    out = {}
    for world, port in zip(worlds, ports):
        if rank >= world:
            continue
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=120))
        try:
            recipe, model = evaluator(root, DistContext(rank, world, rank, torch.device("cpu")))
            model.load_state_dict(torch.load(weights))
            out[world] = evaluate_split(recipe, model, "valid", recipe.ctx)
        finally:
            dist.destroy_process_group()
    return out


def _forked_rank(i, worlds, ports, root, weights):
    """Ranks 1, 2, ...; rank 0 is the test's own process. Forked, they find torch and timm imported (spawned
    interpreters would take seconds each to import them again)."""
    torch.set_num_threads(1)
    torch.save(evaluate_as(i + 1, worlds, ports, root, weights), f"{weights}.rank{i + 1}")


def test_evaluation_on_ranks_that_do_not_divide_the_images_is_the_one_rank_evaluation(tmp_path):
    """13 validation images, the same weights, on 1, 2 and 3 gloo ranks: every rank reports the 1-rank numbers,
    which are those of the model on all 13 images at once (nothing padded in, dropped or counted twice)."""
    root = make_image_folder(tmp_path / "imagenet", per_class=(1, 3))  # 12 validation images, and one more:
    shutil.copy(root / "train" / "class_2" / "000.JPEG", root / "val" / "class_2" / "003.JPEG")
    torch.manual_seed(6)  # weights whose top-1 and top-5 are neither 0 nor 100%
    recipe, model = evaluator(root, DistContext(0, 1, 0, torch.device("cpu")))
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    one = evaluate_split(recipe, model, "valid", recipe.ctx)

    images, labels = zip(*(recipe.val_set[i] for i in range(len(recipe.val_set))))
    with torch.no_grad():
        logits = model.eval()(recipe.normalize(torch.stack(images)))
    labels = torch.tensor(labels)
    hits = logits.topk(5, -1).indices == labels[:, None]
    assert len(labels) == 13
    assert one["top1"] == 100 * hits[:, 0].sum().item() / 13 and one["top5"] == 100 * hits.sum().item() / 13
    assert 0 < one["top1"] < one["top5"] < 100  # informative counts
    assert one["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)

    worlds, weights = (2, 3), str(tmp_path / "weights.pt")
    args = (worlds, [free_port() for _ in worlds], str(root), weights)
    ranks = mp.start_processes(_forked_rank, args=args, nprocs=max(worlds) - 1, join=False, start_method="fork")
    try:
        reports = [evaluate_as(0, *args)]
    finally:
        while not ranks.join():  # returns as each process ends
            pass
    reports += [torch.load(f"{weights}.rank{r}") for r in range(1, max(worlds))]
    for world in worlds:
        for rank in range(world):
            got = reports[rank][world]
            assert got.keys() == one.keys(), (world, rank)
            # hits and image counts are integers summed in float64: exactly equal. The loss is a sum of float32
            # per-batch sums, and the batches (4, 2 or 1 images a rank) differ, so its float32 rounding does:
            # about 1e-7 relative per summed term, a few of them, well within 1e-6.
            assert {k: v for k, v in got.items() if k != "loss"} == {k: v for k, v in one.items() if k != "loss"}
            assert got["loss"] == pytest.approx(one["loss"], rel=1e-6, abs=0), (world, rank)


WALL_CLOCK = ("samples_per_s", "time")  # the only logged values a resume may change


def rows(run_dir) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def wds_run(tmp_path_factory):
    """A tiny ViT on 2 ranks from WebDataset shards (labels are sample indices): 24 training samples, one
    undecodable, in 4 shards and 15 validation samples in 3; global batch 8, so 3 steps an epoch, for 2 epochs,
    with a checkpoint at step 4."""
    root = tmp_path_factory.mktemp("wds")
    write_shards(root, "train", 4, 6, corrupt=CORRUPT)
    write_shards(root, "val", 3, 5)
    run_dir = root / "run"
    check(launch("train.py", ["--recipe", "vit_t_early_dropout", "--run-dir", str(run_dir), "--set",
                              *common(root, 2), *VIT, "data.format=wds", "data.train_shards=train-{000000..000003}.tar",
                              "data.val_shards=val-{000000..000002}.tar", "data.train_size=24", "model.num_classes=24",
                              "data.batch_size=8", "optim.lr_batch=8", "drop.cutoff_epoch=1",
                              "train.checkpoint_every=4"], ranks=2))
    return run_dir


def test_webdataset_shards_train_on_two_ranks_and_resume_mid_epoch_where_the_stream_was(wds_run, tmp_path):
    """Cut after step 4 (epoch 1, one batch in) and resumed: steps 5 and 6 log what the uninterrupted run logged,
    bit for bit, which they could not had the resumed stream started elsewhere in the epoch's shard order."""
    full = rows(wds_run)
    assert [r["step"] for r in full if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    valid = [r for r in full if r["split"] == "valid"]
    assert [r["step"] for r in valid] == [3, 6] and valid[-1]["skipped_train_images"] == 2  # the corrupt one, twice
    state = read_client_state(wds_run / "checkpoints", "step_00000004")["trainer"]
    assert (state["epoch"], state["steps_in_epoch"]) == (1, 1)

    run = cut(wds_run, tmp_path / "cut", 4)
    out = check(launch("train.py", ["--run-dir", str(run), "--resume"], ranks=2))
    assert "resumed from step_00000004 at step 4" in out
    kept = len(rows(run)) - 3  # rows logged before the cut: the resume added train 5, train 6, valid 6
    assert rows(run)[:kept] == full[:kept] and rows(run)[kept:] == full[kept:]
    assert [(r["split"], r["step"]) for r in full[kept:]] == [("train", 5), ("train", 6), ("valid", 6)]


@pytest.fixture(scope="module")
def mixer_run(images, tmp_path_factory):
    """Late stochastic depth 0.4 from epoch 3 of 6; stopped at step 7 (mid epoch 3), then resumed."""
    run_dir = tmp_path_factory.mktemp("mixer") / "run"
    args = ["--recipe", "mixer_b_late_sd", "--run-dir", str(run_dir), "--set", *common(images, 6),
            "model.name=mixer_s32_224", "data.image_size=64", "drop.cutoff_epoch=3", "train.checkpoint_every=1",
            "data.mixup=0.0", "data.cutmix=0.0"]
    check(launch("train.py", [*args, "train.max_steps=7"], ranks=2))
    first = dict(scalars(run_dir, "drop/drop_path"))
    out = check(launch("train.py", ["--run-dir", str(run_dir), "--resume", "--set", "train.max_steps=0"], ranks=2))
    assert "resumed from step_00000007 at step 7" in out
    return run_dir, first


def test_late_stochastic_depth_starts_at_the_cutoff_and_resume_continues_it(mixer_run):
    run_dir, before_resume = mixer_run
    assert sorted(before_resume) == list(range(1, 8))
    drop_path = scalars(run_dir, "drop/drop_path")
    assert sorted(drop_path) == list(range(1, 19))  # the resumed run went on from step 8, not from 1
    assert [drop_path[s] for s in range(1, 19)] == pytest.approx([0.0] * 9 + [0.4] * 9)  # float32 events
    assert set(scalars(run_dir, "drop/dropout").values()) == {0.0}


def test_mixer_learns(mixer_run):
    run_dir, _ = mixer_run
    valid = records(run_dir, "valid")
    assert valid[-1]["step"] == 18 and valid[-1]["top1"] >= 60.0, valid[-1]
    assert valid[-1]["loss"] < 0.5 * valid[0]["loss"]
    steps = [r["step"] for r in records(run_dir, "train")]
    assert steps == sorted(set(steps)) and steps[-1] == 18  # no step logged twice across the resume


def test_unknown_model_is_a_one_line_error(images, tmp_path):
    proc = launch("train.py", ["--recipe", "vit_t", "--run-dir", str(tmp_path / "x"), "--set", *common(images, 1),
                               "model.name=vit_tiny_patch16_22"])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    (line,) = error_lines(proc)
    assert "vit_tiny_patch16_22" in line and "did you mean 'vit_tiny_patch16_224'" in line
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_missing_image_folder_is_a_one_line_error(tmp_path):
    proc = launch("train.py", ["--recipe", "vit_t", "--run-dir", str(tmp_path / "x"), "--set",
                               *common(tmp_path / "nowhere", 1)])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    (line,) = error_lines(proc)
    assert "nowhere" in line


def test_gradient_analysis_is_logged_on_two_ranks(images, tmp_path):
    run_dir = tmp_path / "run"
    check(launch("train.py", ["--recipe", "vit_t_early_dropout", "--run-dir", str(run_dir), "--set",
                              *common(images, 2), *VIT, "drop.cutoff_epoch=1", "analysis.enabled=true",
                              "analysis.every=3", "analysis.batches=2", "analysis.reference_batches=3"], ranks=2))
    values = {tag: scalars(run_dir, f"analysis/{tag}") for tag in
              ("grad_norm", "distance_from_init", "grad_direction_variance", "grad_direction_error")}
    assert all(sorted(v) == [3, 6] for v in values.values()), values
    assert 0 < values["distance_from_init"][3] < values["distance_from_init"][6]
    assert values["grad_norm"][3] > 0
    for tag in ("grad_direction_variance", "grad_direction_error"):
        assert all(0.0 < x < 2.0 for x in values[tag].values()), (tag, values[tag])


COMPILED = ["data.format=synthetic", "data.train_size=1000", "model.num_classes=4", "data.image_size=32",
            "data.batch_size=8", "data.workers=1", *VIT, "train.log_every=1", "train.progress=false",
            "train.test_at_end=false", "train.max_steps=6", "train.checkpoint_every=3", "train.epochs=4",
            "drop.cutoff_epoch=2", "drop.drop_path=0.1"]  # dropout and depth both fall linearly every step


def test_a_compiled_model_follows_the_schedule_without_recompiling_and_resumes_exactly(tmp_path):
    """train.compile=true with linear early dropout and stochastic depth: every step's rates reach the model (the
    losses are the eager run's to float rounding: the draws come from the same eager modules), torch recompiles
    only for evaluation (grad mode), never for a rate, and a resume from step 3 logs the uninterrupted rows."""
    compiled, eager = tmp_path / "compiled", tmp_path / "eager"
    out = check(launch("train.py", ["--recipe", "vit_t_early_dropout", "--run-dir", str(compiled), "--set", *COMPILED,
                                    "train.compile=true"], env={"TORCH_LOGS": "recompiles"}))
    reasons = re.findall(r"\[__recompiles\]\s+- \d+/\d+: (.*)", out)  # what each recompile's guard saw change
    assert reasons and all("grad_mode" in r for r in reasons), reasons
    check(launch("train.py", ["--recipe", "vit_t_early_dropout", "--run-dir", str(eager), "--set", *COMPILED]))
    rates = scalars(compiled, "drop/dropout")
    assert rates == scalars(eager, "drop/dropout") and sorted(rates.values(), reverse=True) == list(rates.values())
    assert len(set(rates.values())) == 6  # a new rate every step
    loss = {r["step"]: r["loss"] for r in records(compiled, "train")}
    assert loss == pytest.approx({r["step"]: r["loss"] for r in records(eager, "train")}, rel=1e-5)
    resumed = cut(compiled, tmp_path / "resumed", 3)
    check(launch("train.py", ["--run-dir", str(resumed), "--resume"]))
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time", "samples_per_s")} for r in rows]  # noqa: E731
    assert strip(records(resumed, "train")) == strip(records(compiled, "train"))
    assert strip(records(resumed, "valid")) == strip(records(compiled, "valid"))
