"""The ImageNet recipe's per-step hook on a live model: the cached sites it assigns each step leave the model as
the full module walk would, and the loader's rate is reported every ``train.log_every`` steps."""

import copy

import pytest
import torch

from recipes.imagenet.recipe import ImageNetRecipe
from trainer.batching import plan_batch
from trainer.distributed import DistContext
from trainer.registry import get_recipe
from recipes.imagenet.drop_sites import current_rates, set_drop_path, set_dropout


@pytest.fixture
def recipe():
    cfg = get_recipe("vit_t_early_dropout").load_config([], [
        "data.format=synthetic", "data.train_size=48", "model.num_classes=3", "data.image_size=32",
        "data.batch_size=8", "data.workers=0", "train.epochs=4", "train.log_every=3", "drop.dropout=0.2",
        "drop.drop_path=0.3", "drop.drop_path_mode=late", "drop.drop_path_schedule=constant", "drop.cutoff_epoch=2",
        "model.kwargs={patch_size: 8, embed_dim: 32, depth: 3, num_heads: 2}"])
    r = ImageNetRecipe(cfg, DistContext(0, 1, 0, torch.device("cpu")))
    r.setup()
    r.stream = r.train_data(plan_batch(8, 1, 0))  # the tests' handle on its training stream
    return r


def test_each_step_sets_what_the_full_walk_sets(recipe):
    model = recipe.build_model()
    walked = copy.deepcopy(model)
    steps = recipe.stream.steps_per_epoch() * recipe.cfg.train.epochs  # 6 per epoch: early linear dropout, late depth
    logged = {}
    for step, ts in zip(range(steps), (ts for e in range(4) for ts in recipe.stream.steps(e))):
        logged[step] = recipe.begin_step(model, step, 0.0, recipe.stream).scalars
        dropout, drop_path = recipe.stream.dropout_schedule.value(step), recipe.stream.drop_path_schedule.value(step)
        set_dropout(walked, dropout)
        set_drop_path(walked, drop_path)
        assert current_rates(model) == current_rates(walked), step
        assert logged[step]["drop/dropout"] == pytest.approx(dropout)
        assert logged[step]["drop/drop_path"] == pytest.approx(drop_path)
        assert model.head_drop.p == 0.0
    assert {s for s, out in logged.items() if "perf/loader_samples_per_s" in out} == {2, 5, 8, 11, 14, 17, 20, 23}
    assert all(out["perf/loader_samples_per_s"] > 0 for out in logged.values() if len(out) == 3)
    assert logged[0]["drop/dropout"] == pytest.approx(0.2) and logged[11]["drop/dropout"] == 0.0
    assert logged[11]["drop/drop_path"] == 0.0 and logged[12]["drop/drop_path"] == pytest.approx(0.3)


def test_batches_reach_the_model_normalized(recipe):
    ts = next(iter(recipe.stream.steps(0)))
    micro, = ts.micro_batches
    images = micro.images
    assert images.dtype == torch.float32 and images.shape == (8, 3, 32, 32)
    raw = recipe.stream.loader.loader.dataset[0][0]  # the synthetic split's one uint8 image
    want = recipe.normalize(raw.unsqueeze(0))[0]
    kept = images[0] == want  # random erasing may have replaced a box of it with noise
    assert kept.float().mean() > 0.5 and torch.equal(images[0][kept], want[kept])


def test_adamw_runs_torchs_multi_tensor_loop_on_cpu(recipe):
    """One kernel per step on CUDA (fused, tests/gpu/test_gpu.py); torch's foreach loop over the tensors elsewhere."""
    opt = recipe.build_optimizer(recipe.build_model())
    assert type(opt).__name__ == "AdamW" and opt.defaults["foreach"] is True and not opt.defaults["fused"]
