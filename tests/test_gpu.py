"""What only a CUDA device can show: bf16 end to end, TF32 really off under fp32, host syncs per optimizer step,
the device RNG across a resume, the fused cuDNN LSTM under weight drop, and the gradient analysis of an AWD-LSTM.
Every test skips on a machine without CUDA; bench/gpu_check.sh runs them on one GPU."""

import json
import random
import warnings

import pytest
import torch

from conftest import check, launch, make_image_folder

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
def test_fp32_turns_tf32_off_and_matmuls_are_ieee():
    from trainer.precision import apply_precision

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        apply_precision("tf32")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        apply_precision("fp32")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        g = torch.Generator(device="cuda").manual_seed(0)
        a, b = (torch.randn(1024, 1024, device="cuda", generator=g) for _ in range(2))
        exact = a.double() @ b.double()
        err = ((a @ b).double() - exact).abs().max().item() / exact.abs().max().item()
        assert err < 1e-5, err  # TF32's 10-bit mantissa gives ~1e-3
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ------------------------------------------------------------------ (c) host syncs per optimizer step
def _syncs_during_fit(corpus, tmp_path, steps: int) -> int:
    from trainer.distributed import init_distributed
    from trainer.engine import Trainer
    from trainer.registry import get_recipe
    from trainer.rundir import RunDir

    spec = get_recipe("awd_ptb")
    cfg = spec.load_config([], [*SMALL_AWD, f"data.root={corpus}", f"train.max_steps={steps}",
                                "train.log_every=100000", "train.eval_every=100000",
                                "train.checkpoint_every=100000"])
    trainer = Trainer(spec, cfg, init_distributed(), RunDir(tmp_path / f"run{steps}"), resume=False)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.fit()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_one_host_sync_per_optimizer_step(corpus, tmp_path):
    """The step guard reads its one small all-reduced flag vector per step (agree_on_step's ``tolist``); the
    end-of-run validation and checkpoint are the same in both runs and cancel out."""
    few, more = _syncs_during_fit(corpus, tmp_path, 4), _syncs_during_fit(corpus, tmp_path, 12)
    assert (more - few) / 8 <= 1.0, (few, more)


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
def test_weight_drop_lstm_runs_the_fused_cudnn_kernel():
    from trainer.regularizers.weight_drop import WeightDropLSTM

    lstm = WeightDropLSTM(32, 64, weight_drop=0.5).cuda().train()
    x = torch.randn(20, 4, 32, device="cuda", requires_grad=True)
    with warnings.catch_warnings(record=True) as caught, torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        warnings.simplefilter("always")
        out = lstm(x)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()
        torch.cuda.synchronize()
    assert not [w for w in caught if "single contiguous chunk of memory" in str(w.message)]
    names = {e.key for e in prof.key_averages()}
    assert any("cudnn_rnn" in n for n in names), sorted(names)[:40]


# ------------------------------------------------------------------ (f) gradient analysis on CUDA
def test_gradient_analysis_of_awd_lstm_on_cuda(corpus, tmp_path):
    run_dir = tmp_path / "run"
    check(launch("train.py", ["--recipe", "awd_ptb", "--run-dir", str(run_dir), "--set", *SMALL_AWD,
                              f"data.root={corpus}", "train.max_steps=4", "analysis.enabled=true",
                              "analysis.every=2", "analysis.batches=2", "analysis.reference_batches=2"]))
    error = scalars(run_dir, "analysis/grad_direction_error")
    assert sorted(error) == [2, 4] and all(0.0 <= v <= 2.0 for v in error.values()), error
    assert scalars(run_dir, "analysis/distance_from_init")[4] > 0.0
