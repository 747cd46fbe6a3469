"""Real Trainers (AWD-LSTM, a tiny ViT) on 2 gloo ranks in this test's own processes, where the optimizer can be
watched.

The variable-length BPTT rescale and the 0.25 gradient clip, read off the optimizer DeepSpeed really steps, under
ZeRO 0 (the loop clips on the device before ``engine.step()``, trainer/clipping.py) and ZeRO 2 (the ZeRO optimizer
clips its partitions): a step
pre-hook on the base optimizer records, inside each real ``step()``, the learning rate in its param group and the
global norm of the gradients it is about to consume; the step's sequence length is read from the batch the model
was fed, not from the logged base rate. And the gradient analysis, run every 3 steps, leaves the run's logged
losses the same bit for bit: AWD-LSTM carries hidden state across steps and keys its own dropout masks, the ViT
draws its dropout (and mixup / cutmix) from the global RNG streams, so between them every piece of state the
analysis must put back is checked."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness.launching import free_port
from harness.metrics import rows, scalars
from harness.shapes import TINY_VIT


BPTT, LR, CLIP, STEPS = 20, 30.0, 0.25, 8
ANALYSIS = ["analysis.enabled=true", "analysis.every=3", "analysis.batches=2", "analysis.reference_batches=2"]
AWD = ["model.emsize=32", "model.nhid=48", f"data.bptt={BPTT}", f"train.max_steps={STEPS}", "train.epochs=1",
       "data.verify=false", "data.download=false"]
VIT = [*TINY_VIT, "data.train_size=1000", "data.workers=0", "train.max_steps=6"]  # timm's dropout: global RNG
RUNS = [  # (run directory, recipe, --set): the ZeRO 0 / 2 AWD runs are watched, the others run as they are
    ("awd_zero0", "awd_ptb", [*AWD, "train.zero_stage=0"]),
    ("awd_zero2", "awd_ptb", [*AWD, "train.zero_stage=2"]),
    ("awd_zero0_analysis", "awd_ptb", [*AWD, "train.zero_stage=0", *ANALYSIS]),
    ("vit", "vit_t_early_dropout", VIT),
    ("vit_analysis", "vit_t_early_dropout", [*VIT, *ANALYSIS]),
    ("vit_log3", "vit_t_early_dropout", [*VIT, "train.log_every=3"]),  # TensorBoard's flushes counted
]


def _record(trainer, stage: int) -> dict:
    """Hook the run's engine, training stream and base optimizer; the real step still runs."""
    rec = {"seq_len": [], "pre": [], "lr": [], "post": []}
    data, engine, base = trainer.data, trainer.engine, trainer.scheduler.optimizer
    train_steps, engine_step = data.steps, engine.step

    def steps(epoch):
        for ts in train_steps(epoch):
            rec["seq_len"].append(ts.micro_batches[0].inputs.size(0))  # the rows of the inputs the model gets
            yield ts

    def step(*args, **kwargs):
        out = engine_step(*args, **kwargs)
        if stage:  # ZeRO keeps them in its own buffers; it reports the norm it clipped by
            rec["pre"].append(float(engine.get_global_grad_norm()))
        return out

    if stage == 0:  # the averaged, unclipped gradients are in .grad until the loop clips them
        assert trainer.clipper is not None and engine.gradient_clipping() == 0.0  # and DeepSpeed does not
        clip = trainer.clipper.clip

        def clipped():
            rec["pre"].append(float(torch.cat([p.grad.reshape(-1) for p in engine.module.parameters()]).norm()))
            return clip()

        trainer.clipper.clip = clipped

    def pre_hook(optimizer, args, kwargs):  # inside the real step: what it is about to consume
        rec["lr"].append([g["lr"] for g in optimizer.param_groups])
        sq = torch.zeros((), dtype=torch.float64)
        for g in optimizer.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    sq += p.grad.double().pow(2).sum()
        if stage:  # each rank holds its partition of the flat gradient
            dist.all_reduce(sq)
        rec["post"].append(float(sq.sqrt()))

    data.steps, engine.step = steps, step
    base.register_step_pre_hook(pre_hook)
    return rec


def _count_flushes(tb) -> dict:
    seen = {"flushes": 0}
    flush = tb.flush

    def counted():
        seen["flushes"] += 1
        flush()

    tb.flush = counted
    return seen


def _rank(rank: int, port: int, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    import deepspeed

    from trainer.distributed import DistContext
    from trainer.engine import Trainer
    from trainer.registry import get_recipe
    from trainer.rundir import RunDir

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    deepspeed.init_distributed("gloo")
    ctx = DistContext(rank=rank, world=2, local_rank=rank, device=torch.device("cpu"))
    report = {}
    for name, recipe, sets in RUNS:
        spec = get_recipe(recipe)
        cfg = spec.load_config([], [f"data.root={data}", "train.log_every=1", "train.eval_every=0",
                                    "train.checkpoint_every=100000", "train.test_at_end=false", "train.progress=false",
                                    *sets])
        trainer = Trainer(spec, cfg, ctx, RunDir(f"{out}/{name}"), resume=False)
        watched = recipe == "awd_ptb" and not cfg.analysis.enabled
        report[name] = _record(trainer, cfg.train.zero_stage) if watched else None
        if name == "vit_log3" and trainer.monitor.tb is not None:  # rank 0 writes TensorBoard
            report[name] = _count_flushes(trainer.monitor.tb)
        trainer.fit()
    torch.save(report, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ptb_slice):
    out = tmp_path_factory.mktemp("engine")
    mp.spawn(_rank, args=(free_port(), str(ptb_slice), str(out)), nprocs=2, join=True)
    return out, [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


@pytest.mark.parametrize("stage", ["awd_zero0", "awd_zero2"])
def test_the_stepped_optimizer_gets_the_rescaled_rate_and_clipped_gradients(runs, stage):
    out, reports = runs
    rec = reports[0][stage]
    assert all(len(v) == STEPS for v in rec.values()), rec
    assert reports[1][stage] == rec  # both ranks stepped the same rate and the same global norm
    assert len(set(rec["seq_len"])) > 2, rec["seq_len"]  # the sampler varied the length
    assert rec["lr"] == [[pytest.approx(LR * n / BPTT, rel=1e-12)] for n in rec["seq_len"]]
    logged = [(r["lr"], r["lr_applied"]) for r in rows(out / stage) if r["split"] == "train"]
    assert logged == [(LR, lr) for (lr,) in rec["lr"]]  # metrics.jsonl: scheduled, and what the step used
    pre, post = rec["pre"], rec["post"]
    assert any(g > CLIP for g in pre) and any(g < CLIP for g in pre), pre  # both sides of the clip
    assert all(g <= CLIP for g in post), post
    assert post == [pytest.approx(min(g, CLIP), rel=1e-5) for g in pre]


@pytest.mark.parametrize("run", ["awd_zero0", "vit"])
def test_the_gradient_analysis_leaves_training_unchanged(runs, run):
    out, _ = runs
    plain, analysed = out / run, out / f"{run}_analysis"
    steps = len(scalars(plain, "train/loss"))
    assert sorted(scalars(analysed, "analysis/grad_norm")) == list(range(3, steps + 1, 3))  # it ran
    assert [r["step"] for r in rows(plain) if r["split"] == "train"] == list(range(1, steps + 1))
    assert rows(analysed) == rows(plain)  # ==: every loss, rate and the final validation, bit for bit


def test_tensorboard_is_flushed_on_the_logging_cadence_and_has_one_learning_rate(runs):
    """The schedule writes drop/dropout every step; those writes wait for the next record's flush (every
    train.log_every=3 steps, and the final validation), not one flush per step. DeepSpeed's own monitor stays off:
    train/lr is the one learning-rate series, on the step axis."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, reports = runs
    run = out / "vit_log3"
    records = len(rows(run))
    assert reports[0]["vit_log3"]["flushes"] <= records + 1, (reports[0]["vit_log3"], records)  # + fit's last
    assert sorted(scalars(run, "drop/dropout")) == list(range(1, 7))  # every step's rate reached the file
    assert sorted(scalars(run, "train/lr")) == [3, 6]
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert not [tag for tag in acc.Tags()["scalars"] if tag.startswith("Train/")], acc.Tags()["scalars"]
