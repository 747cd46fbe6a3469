"""What only a CUDA device can show: bf16 end to end, TF32 really off under fp32 (matmuls, cuDNN convolutions and
LSTMs), one host sync per optimizer step (named by source) and none per evaluation batch, the device a one-GPU task
ends up on whatever its LOCAL_RANK, the device RNG across a resume, the fused cuDNN LSTM under weight drop in fp32 and
bf16 and its agreement with PyTorch's own LSTM, fused AdamW, and the gradient analysis of an AWD-LSTM. Every test
skips on a machine without CUDA; bench/gpu_check.sh runs them on one GPU."""

import json
import os
import random
import subprocess
import sys
import warnings

import pytest
import torch

from harness.images import make_image_folder
from harness.launching import check, checkout_env, free_port, launch, launcher_env
from harness.paths import REPO as ROOT


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device: bf16, TF32, cuDNN and host syncs exist only there")

SMALL_AWD = ["model.emsize=64", "model.nhid=128", "model.nlayers=3", "data.bptt=20", "data.batch_size=8",
             "data.eval_batch_size=8", "data.verify=false", "data.download=false", "train.test_at_end=false",
             "train.progress=false"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A PTB-shaped corpus of random words: enough tokens for many steps in one epoch."""
    root = tmp_path_factory.mktemp("corpus") / "ptb"
    root.mkdir()
    rng = random.Random(0)
    words = [f"w{i}" for i in range(500)]
    for split, lines in (("train", 3000), ("valid", 200), ("test", 200)):
        (root / f"{split}.txt").write_text("".join(" ".join(rng.choices(words, k=20)) + "\n" for _ in range(lines)))
    return root.parent


def scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


# ------------------------------------------------------------------ (a) bf16 end to end
def test_bf16_vit_t_end_to_end(tmp_path):
    images = make_image_folder(tmp_path / "imagenet", size=64)
    run_dir = tmp_path / "run"
    check(launch("train.py", ["--recipe", "vit_t", "--run-dir", str(run_dir), "--set", f"data.root={images}",
                              "data.batch_size=32", "data.image_size=224", "data.workers=2", "train.epochs=2",
                              "train.log_every=1", "train.progress=false", "train.precision=bf16",
                              "model.name=vit_tiny_patch16_224"]))
    losses = [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "train"]
    assert losses and all(torch.isfinite(torch.tensor(losses))), losses
    module = torch.load(run_dir / "checkpoints" / "best" / "mp_rank_00_model_states.pt", weights_only=False)
    assert {v.dtype for k, v in module["module"].items() if v.is_floating_point()} == {torch.bfloat16}
    masters = torch.load(run_dir / "checkpoints" / "best" / "fp32_weights.pt")
    assert masters and {v.dtype for v in masters.values()} == {torch.float32}


# ------------------------------------------------------------------ (b) TF32 off under fp32
def _relative_errors() -> dict[str, float]:
    """Each op's largest error against float64, relative to the largest value: IEEE fp32 gives ~1e-6, TF32's 10-bit
    mantissa ~1e-3."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def rel(out: torch.Tensor, exact: torch.Tensor) -> float:
        return ((out.double() - exact).abs().max() / exact.abs().max()).item()

    a, b = (torch.randn(1024, 1024, device="cuda", generator=g) for _ in range(2))
    x, w = torch.randn(8, 64, 32, 32, device="cuda", generator=g), torch.randn(64, 64, 3, 3, device="cuda", generator=g)
    lstm = torch.nn.LSTM(256, 512).cuda()
    seq = torch.randn(35, 16, 256, device="cuda", generator=g)
    return {"matmul": rel(a @ b, a.double() @ b.double()),
            "conv": rel(torch.nn.functional.conv2d(x, w), torch.nn.functional.conv2d(x.double(), w.double())),
            "lstm": rel(lstm(seq)[0], lstm.double()(seq.double())[0])}


def test_fp32_turns_tf32_off_for_matmuls_convolutions_and_lstms():
    from trainer.precision import apply_precision

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        apply_precision("tf32")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        tf32 = _relative_errors()
        apply_precision("fp32")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        fp32 = _relative_errors()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert all(err < 1e-5 for err in fp32.values()), fp32
    assert tf32["matmul"] > 1e-4 and tf32["conv"] > 1e-4, tf32  # the test can tell TF32 from IEEE on this GPU


# ------------------------------------------------------------------ (c) host syncs per optimizer step
def _syncs_per_step(corpus, tmp_path, precision: str) -> dict[str, float]:
    from trainer.commands import fit_in_process
    from trainer.host_syncs import count_host_syncs, per_step

    counts = []
    for steps in (4, 14):
        sets = [*SMALL_AWD, f"data.root={corpus}", f"train.max_steps={steps}", f"train.precision={precision}",
                "train.log_every=100000", "train.eval_every=100000", "train.checkpoint_every=100000"]
        with count_host_syncs() as c:
            fit_in_process("awd_ptb", sets, tmp_path / f"run-{precision}-{steps}")
        counts.append(c)
    return per_step(*counts, 10)


def _agreement_line() -> str:
    """trainer/faults/step_guard.py's line that reads the agreed flags back (``flags.tolist()``)."""
    from trainer.faults import step_guard

    lines = open(step_guard.__file__).read().splitlines()
    return f"trainer/faults/step_guard.py:{next(i for i, l in enumerate(lines, 1) if '.tolist()' in l)}"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_host_sync_per_optimizer_step(corpus, tmp_path, precision):
    """The step guard reads its one small all-reduced flag vector per step; nothing else reads back or copies from
    the host, DeepSpeed's clipping and its BF16 optimizer's checks included (the loop does them on the device). A
    new sync fails this test by its file and line."""
    assert _syncs_per_step(corpus, tmp_path, precision) == {_agreement_line(): 1.0}


def test_imagenet_evaluation_has_no_sync_per_batch(tmp_path):
    """Evaluation reads its sums back once, whatever the number of batches."""
    from trainer.startup import init_distributed
    from trainer.evaluation import evaluate_split
    from trainer.host_syncs import count_host_syncs
    from trainer.registry import get_recipe

    spec = get_recipe("vit_t")
    ctx = init_distributed()
    counts = []
    for images in (32, 96):
        cfg = spec.load_config([], ["data.format=synthetic", f"data.train_size={25 * images}", "model.num_classes=10",
                                    "data.image_size=32", "data.eval_batch_size=16", "data.workers=0",
                                    "model.kwargs={patch_size: 8, embed_dim: 48, depth: 2, num_heads: 3}"])
        recipe = spec.factory(cfg, ctx)
        recipe.setup()
        model = recipe.build_model().to(ctx.device)
        with count_host_syncs() as c:
            evaluate_split(recipe, model, "valid", ctx)
        counts.append(sum(c.values()))
    assert counts[0] == counts[1], counts  # 2 batches or 6: the same reads


def test_a_one_gpu_task_runs_on_that_gpu_whatever_its_local_rank(corpus, tmp_path):
    """--gpus-per-task=1 (here: one visible device) with LOCAL_RANK=1: the rank picks device 0, and DeepSpeed's
    engine, the parameters and the current device are that one (DeepSpeed alone would set_device(LOCAL_RANK))."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    env = checkout_env(launcher_env({"CUDA_VISIBLE_DEVICES": visible,
                        "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "probes" / "device_probe.py"), str(corpus),
                           str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"chosen": "cuda:0", "engine": "cuda:0", "parameters": ["cuda:0"], "current": 0, "steps": 2}


def test_adamw_is_fused_on_cuda():
    from trainer.distributed import DistContext
    from trainer.registry import get_recipe

    spec = get_recipe("vit_t")
    cfg = spec.load_config([], ["data.format=synthetic", "data.train_size=64", "model.num_classes=4",
                                "data.image_size=32", "data.batch_size=8", "model.kwargs={patch_size: 8}"])
    recipe = spec.factory(cfg, DistContext(0, 1, 0, torch.device("cuda", 0)))
    recipe.setup()
    opt = recipe.build_optimizer(recipe.build_model().cuda())
    assert type(opt).__name__ == "AdamW" and opt.defaults["fused"] is True


# ------------------------------------------------------------------ (d) the device RNG across a resume
def test_cuda_rng_state_is_restored():
    from trainer.rng import capture_rng, restore_rng

    torch.cuda.init()
    torch.rand(3, device="cuda")
    saved = capture_rng()
    before = torch.cuda.get_rng_state()
    torch.rand(1000, device="cuda")
    assert not torch.equal(torch.cuda.get_rng_state(), before)
    restore_rng(saved)
    assert torch.equal(torch.cuda.get_rng_state(), before)
    assert saved["cuda"]["index"] == torch.cuda.current_device()


# ------------------------------------------------------------------ (e) the fused cuDNN LSTM under weight drop
def _cudnn_takes(dtype: torch.dtype) -> bool:
    return torch.cudnn_is_acceptable(torch.zeros(2, 2, 2, device="cuda", dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_drop_lstm_runs_the_fused_cudnn_kernel(dtype):
    if not _cudnn_takes(dtype):
        pytest.skip(f"this PyTorch's cuDNN takes no {dtype} LSTM (bf16 needs cuDNN 9.13+): PyTorch's own LSTM runs")
    from recipes.awd_lstm.regularizers.weight_drop import WeightDropLSTM

    lstm = WeightDropLSTM(32, 64, weight_drop=0.5).cuda().to(dtype).train()
    x = torch.randn(20, 4, 32, device="cuda", dtype=dtype, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught, torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        warnings.simplefilter("always")
        for _ in range(2):  # the second forward reuses the flat buffer the first wrote
            out = lstm(x)[0]
            out.float().sum().backward()
        torch.cuda.synchronize()
    assert not [w for w in caught if "single contiguous chunk of memory" in str(w.message)]
    names = {e.key for e in prof.key_averages()}
    assert any("cudnn_rnn" in n for n in names), sorted(names)[:40]
    assert lstm._cudnn is not None and lstm._cudnn.flat.dtype == dtype


def test_flat_buffer_lstm_equals_pytorchs_own_lstm_with_the_same_mask():
    """cuDNN with the weights written into its flat buffer against PyTorch's LSTM (cuDNN off) on the same masked
    weights: outputs and every gradient within 1e-5, in fp32 with TF32 off."""
    from trainer.precision import apply_precision
    from recipes.awd_lstm.regularizers.weight_drop import WeightDropLSTM

    apply_precision("fp32")
    torch.manual_seed(0)
    lstm = WeightDropLSTM(32, 64, weight_drop=0.5).cuda().train()
    x = torch.randn(20, 4, 32, device="cuda")
    mask = lstm.draw_mask().clone()
    results = []
    for cudnn in (True, False):
        with torch.backends.cudnn.flags(enabled=cudnn):
            lstm.zero_grad()
            xi = x.clone().requires_grad_()
            out, (h, c) = lstm(xi, mask=mask)
            (out.pow(2).sum() + h.sum() + c.sum()).backward()
            results.append([out, h, c, xi.grad] + [p.grad.clone() for p in lstm.parameters()])
    assert lstm._cudnn is not None  # the first pass did take the flat buffer
    for fused, plain in zip(*results):
        assert torch.allclose(fused, plain, rtol=1e-5, atol=1e-5), (fused - plain).abs().max()


# ------------------------------------------------------------------ (f) gradient analysis on CUDA
def test_gradient_analysis_of_awd_lstm_on_cuda(corpus, tmp_path):
    run_dir = tmp_path / "run"
    check(launch("train.py", ["--recipe", "awd_ptb", "--run-dir", str(run_dir), "--set", *SMALL_AWD,
                              f"data.root={corpus}", "train.max_steps=4", "analysis.enabled=true",
                              "analysis.every=2", "analysis.batches=2", "analysis.reference_batches=2"]))
    error = scalars(run_dir, "analysis/grad_direction_error")
    assert sorted(error) == [2, 4] and all(0.0 <= v <= 2.0 for v in error.values()), error
    assert scalars(run_dir, "analysis/distance_from_init")[4] > 0.0
