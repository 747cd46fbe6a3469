"""train.precision: the TF32 switches, the DeepSpeed config each mode gives (timers off, fp32 reduction and
accumulation, clipping left to the loop where DeepSpeed's would read back from the device), and, on 2 gloo ranks
under real DeepSpeed bf16 engines, that the NT-ASGD average, the distance from initialization and a checkpoint's
weights are those of the fp32 master weights, not of their bf16 copies, and that the loop's clipping and update
under DeepSpeed's BF16 optimizer step as DeepSpeed's own does, a non-finite gradient included."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from harness.launching import free_port
from trainer.batching import plan_batch
from trainer.clipping import DeviceClipper, clips_on_device
from trainer.config import AnalysisConfig
from trainer.deepspeed_engine import deepspeed_config, resolve_precision
from trainer.distributed import DistContext
from trainer.errors import ConfigError
from trainer.precision import apply_precision, fp32_state, initialize
from trainer.registry import get_recipe

CPU = DistContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
T0, STEPS = 3, 8


def awd(*overrides):
    return get_recipe("awd_ptb").load_config([], ["data.batch_size=8", *overrides])


@pytest.fixture
def tf32_switches():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("precision, tf32", [("fp32", False), ("tf32", True), ("bf16", False)])
def test_tf32_is_set_explicitly_either_way(tf32_switches, precision, tf32):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
    apply_precision(precision)
    assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")


@pytest.mark.parametrize("recipe", ["awd_ptb", "vit_t"])
def test_every_mode_is_accepted_auto_is_fp32_off_a_gpu(recipe):
    spec = get_recipe(recipe)
    for choice, want in (("auto", "fp32"), ("fp32", "fp32"), ("tf32", "tf32"), ("bf16", "bf16")):
        cfg = spec.load_config([], [f"train.precision={choice}"])
        assert resolve_precision(cfg, spec.factory, CPU) == want
    with pytest.raises(ConfigError, match="train.precision"):
        spec.load_config([], ["train.precision=fp16"])


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_deepspeed_config_turns_the_synchronizing_timers_off(precision):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = awd("train.zero_stage=0")
    ds = DeepSpeedConfig(deepspeed_config(cfg, plan_batch(8, 1, 0), precision))
    assert not ds.timers_config.enabled and not ds.timers_config.synchronized
    assert not ds.wall_clock_breakdown
    assert ds.communication_data_type == torch.float32 and ds.grad_accum_dtype == "fp32"
    assert ds.bfloat16_config.enabled is (precision == "bf16")
    # DeepSpeed 0.19.8 accumulates bf16 gradients in fp32 from ZeRO stage 1 on (its BF16 optimizer)
    assert ds.zero_optimization_stage == (1 if precision == "bf16" else 0)


@pytest.mark.parametrize("precision, stage, loop_clips", [
    ("fp32", 0, True), ("tf32", 0, True), ("fp32", 1, False), ("fp32", 2, False),  # ZeRO's optimizer clips itself
    ("bf16", 0, True), ("bf16", 1, True), ("bf16", 2, False),  # bf16 at stage 0 and 1: DeepSpeed's BF16 optimizer
])
def test_deepspeed_clips_only_where_the_loop_does_not(precision, stage, loop_clips):
    ds = deepspeed_config(awd(f"train.zero_stage={stage}"), plan_batch(8, 1, 0), precision)
    assert ds["gradient_clipping"] == (0.0 if loop_clips else 0.25)
    assert clips_on_device(precision, stage) is loop_clips
    assert "tensorboard" not in ds  # the loop writes TensorBoard itself: one learning-rate series, flushed by it


# ------------------------------------------------------------------ bf16 engines on 2 gloo ranks
class Stub:
    """What a checkpoint asks of a training stream, and nothing else."""

    def state_dict(self):
        return {}

    def rank_state_dict(self):
        return {}


def flat(state: dict) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in state.values()])


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    import deepspeed

    from trainer.analysis import GradientAnalysis
    from trainer.callbacks import Callbacks
    from trainer.checkpoint import Checkpointer, load_weights
    from trainer.nt_asgd.averager import NTASGD

    torch.set_num_threads(1)  # two ranks on a small machine
    dist.init_process_group("gloo", rank=rank, world_size=2)
    deepspeed.init_distributed("gloo")
    ctx = DistContext(rank=rank, world=2, local_rank=rank, device=torch.device("cpu"))
    report = {}
    for stage in (0, 2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5))  # 174 values: ranks cut mid-tensor
        init = flat({n: p.detach().clone() for n, p in model.named_parameters()})
        analysis = GradientAnalysis(AnalysisConfig(enabled=True), model, ctx)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        config = deepspeed_config(awd(f"train.zero_stage={stage}"), plan_batch(8, 2, 0), "bf16")
        engine, _, _, _ = initialize(model, config, optimizer=opt)
        r = {"timer": [engine.tput_timer.config.enabled, engine.tput_timer.config.synchronized],
             "wall_clock": engine.wall_clock_breakdown(), "optimizer": type(engine.optimizer).__name__,
             "dtype": str(next(engine.module.parameters()).dtype),
             "masters_are_init": torch.equal(flat(fp32_state(engine.module)), init),
             "distance_at_start": analysis.distance_from_init()}
        asgd = NTASGD(engine.module, ctx, t0=T0)
        gen = torch.Generator().manual_seed(100 + rank)
        masters, copies = [], []
        for step in range(1, STEPS + 1):
            x, y = torch.randn(4, 7, generator=gen), torch.randn(4, 5, generator=gen)
            engine.backward(nn.functional.mse_loss(engine(x.bfloat16()).float(), y))
            engine.step()
            asgd.after_step(step)
            masters.append(flat(fp32_state(engine.module)))
            copies.append(flat({n: p.detach().float() for n, p in engine.module.named_parameters()}))
        want, of_copies = torch.stack(masters[T0 - 1:]).mean(0), torch.stack(copies[T0 - 1:]).mean(0)
        r["distance_err"] = abs(analysis.distance_from_init() - (masters[-1] - init).norm().item())
        r["average_err"] = (asgd.average.gather() - want).abs().max().item()
        r["copies_gap"] = (of_copies - want).abs().max().item()  # what averaging the bf16 copies would be off by
        ckpt = Checkpointer(engine, out + f"/ckpt{stage}", ctx, keep_last=1)
        with asgd.swapped():
            r["swapped_masters_err"] = (flat(fp32_state(engine.module)) - want).abs().max().item()
            r["swapped_module_is_rounded_average"] = torch.equal(
                flat({n: p.detach() for n, p in engine.module.named_parameters()}), want.bfloat16())
            ckpt.save("best", {}, Stub(), Callbacks([]), signature={})
        r["masters_restored"] = torch.equal(flat(fp32_state(engine.module)), masters[-1])
        r["module_restored"] = torch.equal(
            flat({n: p.detach().float() for n, p in engine.module.named_parameters()}), copies[-1])
        fresh = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5))
        load_weights(fresh, ckpt.dir, "best")
        r["best_err"] = (flat(dict(fresh.named_parameters())).detach() - want).abs().max().item()
        report[stage] = r
    torch.save(report, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def bf16_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16")
    mp.spawn(_rank, args=(free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


def test_bf16_engine_has_fp32_masters_and_no_synchronizing_timer(bf16_report):
    for report in bf16_report:
        for stage, r in report.items():
            assert r["timer"] == [False, False] and r["wall_clock"] is False, stage
            assert r["dtype"] == "torch.bfloat16", stage
            assert r["optimizer"] == {0: "BF16_Optimizer", 2: "DeepSpeedZeroOptimizer"}[stage]
            # the masters start from the fp32 initialization, not from its bf16 rounding
            assert r["masters_are_init"] and r["distance_at_start"] == 0.0, stage
            assert r["distance_err"] < 1e-5, stage


def test_bf16_average_swap_and_best_use_the_masters(bf16_report):
    for report in bf16_report:
        for stage, r in report.items():
            assert r["copies_gap"] > 1e-4, stage  # the test can tell masters from copies
            assert r["average_err"] < 1e-6 and r["swapped_masters_err"] < 1e-6, (stage, r)
            assert r["swapped_module_is_rounded_average"], stage
            assert r["masters_restored"] and r["module_restored"], stage  # the next step starts from the iterate
            assert r["best_err"] < 1e-6, (stage, r)  # init_from / evaluate.py read the fp32 average


# ------------------------------------------------------------------ the loop's clipping and update under bf16
CLIP, POISONED = 3.5, 4  # a step whose gradient holds an inf


def _update_rank(rank: int, port: int, out: str) -> None:
    """The same bf16 training twice: DeepSpeed clipping and checking in its BF16 optimizer's step, and the loop's
    DeviceClipper with the step guard's veto. An inf lands in the gradient at one step: on every rank for DeepSpeed
    (its check is per rank), on rank 1 only for the loop (the agreement carries it to rank 0)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    import deepspeed

    from trainer.faults import StepGate, agree_on_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    deepspeed.init_distributed("gloo")
    ctx = DistContext(rank=rank, world=2, local_rank=rank, device=torch.device("cpu"))
    report = {}
    for variant in ("deepspeed", "loop"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        gate = StepGate(opt)
        config = deepspeed_config(awd("train.zero_stage=0"), plan_batch(8, 2, 0), "bf16")
        if variant == "deepspeed":
            config["gradient_clipping"] = CLIP
        engine, _, _, _ = initialize(model, config, optimizer=opt)
        clipper = DeviceClipper(engine, CLIP) if variant == "loop" else None
        gen = torch.Generator().manual_seed(100 + rank)
        r = report[variant] = {"masters": [], "norms": [], "vetoed": [],
                               "installed": clipper is not None and clipper.bf16}
        for step in range(1, STEPS + 1):
            x, y = torch.randn(4, 7, generator=gen), 5 * torch.randn(4, 5, generator=gen)
            loss = nn.functional.mse_loss(engine(x.bfloat16()).float(), y)
            engine.backward(loss)
            if step == POISONED and (variant == "deepspeed" or rank == 1):
                engine.optimizer.fp32_groups_gradients_flat[0].view(-1)[3] = float("inf")
            if clipper is not None:
                norm = clipper.clip()
                verdict = agree_on_step(ctx, None, torch.isfinite(loss.detach()), norm)
                gate.closed = verdict.vetoed
                r["norms"].append(float(norm))
                r["vetoed"].append(verdict.vetoed)
            engine.step()
            gate.closed = False
            r["masters"].append(flat(fp32_state(engine.module)))
    torch.save(report, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_the_loop_clips_and_updates_bf16_as_deepspeed_does(tmp_path):
    mp.spawn(_update_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        report = torch.load(tmp_path / f"rank{rank}.pt")
        ours, theirs = report["loop"], report["deepspeed"]
        assert ours["installed"]
        assert ours["vetoed"] == [step == POISONED for step in range(1, STEPS + 1)], ours["vetoed"]
        finite = [n for n in ours["norms"] if n != float("inf")]
        assert any(n > CLIP for n in finite) and any(n < CLIP for n in finite), finite  # both sides of the clip
        assert torch.equal(ours["masters"][POISONED - 1], ours["masters"][POISONED - 2])  # the inf step: no update
        for step, (a, b) in enumerate(zip(ours["masters"], theirs["masters"]), 1):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), (rank, step, (a - b).abs().max())
