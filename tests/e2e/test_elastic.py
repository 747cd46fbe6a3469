"""Elastic resume: a checkpoint written on 2 ranks continues on 1 and one written on 1 continues on 2, under ZeRO
stages 0, 1 and 2, with the global batch unchanged; the stages train the same model, and a ZeRO-2 checkpoint also
continues on the world size that wrote it.

Every dropout is off, so training is deterministic and a resumed run must log the same per-step losses as the run
it was cut from, up to the reduction order of another world size (rel 1e-5). That holds only if the weights, the
optimizer state (Adam / AdamW moments, re-cut for the new world under ZeRO), the data position, the AWD-LSTM hidden
state (re-split by column) and the NT-ASGD average all came back: losing any one moves the losses far more.
"""

import json

import pytest
import torch

from harness.launching import check, launch
from harness.run_dirs import cut


# A reference run on 1 rank checkpoints every 2 steps; a copy of it cut at step 2 resumes on 2 ranks up to step 4,
# and that run's own checkpoint resumes on 1 rank up to step 6: both legs must log what the reference logged.
COMMON = ["train.max_steps=6", "train.checkpoint_every=2", "train.eval_every=2", "train.log_every=1",
          "train.test_at_end=false", "train.progress=false"]

# Adam, so the optimizer has state to restore; averaging (NT-ASGD) from step 1, so the average spans the cuts;
# micro-batches of 1 column, so each rank carries several hidden states (2 on 2 ranks, 4 on 1) to re-split.
AWD = ["--recipe", "awd_ptb", "--set", "data.verify=false", "data.download=false", "model.emsize=32", "model.nhid=48",
       "model.nlayers=2", "data.bptt=10", "data.batch_size=4", "train.micro_batch_size=1", "data.eval_batch_size=10",
       "model.dropout=0", "model.dropouth=0", "model.dropouti=0", "model.dropoute=0", "model.wdrop=0",
       "optim.optimizer=adam", "optim.lr=3e-3", "optim.t0=1", *COMMON]

# A tiny ViT on synthetic images with timm's AdamW; no mixup, no random erasing, no drop rates (those draw from
# each rank's own stream on the device, so another world size draws other numbers).
VIT = ["--recipe", "vit_t", "--set", "data.format=synthetic", "data.train_size=48", "model.num_classes=4",
       "data.image_size=16", "data.batch_size=8", "data.workers=0", "data.mixup=0", "data.cutmix=0", "data.reprob=0",
       "data.smoothing=0", "model.kwargs={patch_size: 8, embed_dim: 24, depth: 1, num_heads: 2}", "optim.lr=1e-3",
       "optim.lr_batch=8", "optim.warmup_epochs=0", "train.epochs=2", *COMMON]


def records(run_dir):
    """The last record of each (split, step): what the run that wrote the directory last logged."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(r["split"], r["step"]): r for r in rows}


def resume_leg(run_dir, stop, ranks):
    return check(launch("train.py", ["--run-dir", str(run_dir), "--resume", "--set", f"train.max_steps={stop}"],
                        ranks=ranks))


def elastic_runs(tmp, args, stage):
    """The reference run (1 rank) and the elastic chain 1 -> 2 -> 1 ranks cut from it: (reference, chain dir,
    {(old, new): output of the leg that resumed old ranks' checkpoint on new ranks})."""
    ref, chain = tmp / "reference", tmp / "chain"
    check(launch("train.py", [*args[:2], "--run-dir", str(ref), *args[2:], f"train.zero_stage={stage}"]))
    cut(ref, chain, 2)
    legs = {}
    for old, new, stop in ((1, 2, 4), (2, 1, 6)):
        legs[old, new] = resume_leg(chain, stop, new)
    return ref, chain, legs


def assert_continues(runs, old, new, extra=()):
    """The leg from ``old`` to ``new`` ranks logged the reference's losses for the steps it trained."""
    ref, chain, legs = runs
    start, stop = (2, 4) if (old, new) == (1, 2) else (4, 6)
    assert f"written by {old} rank(s) and continues on {new} " in legs[old, new]
    assert f"resumed from step_{start:08d} at step {start}" in legs[old, new]
    want, got = records(ref), records(chain)
    steps = [k for k in sorted(want) if start < k[1] <= stop]
    assert [k[0] for k in steps] == ["train", "train", "valid"]
    for key in steps:
        assert key in got, key
        for name in ("loss", *(extra if key[0] == "train" else ())):
            assert got[key][name] == pytest.approx(want[key][name], rel=1e-5), (key, name)
    assert (chain / "checkpoints" / f"step_{stop:08d}" / f"rank_{new - 1:05d}.pt").is_file()
    assert not (chain / "checkpoints" / f"step_{stop:08d}" / f"rank_{new:05d}.pt").is_file()


@pytest.fixture(scope="module")
def awd_stages(tmp_path_factory, ptb_slice):
    """The AWD-LSTM chain under each ZeRO stage, built when a test first asks for that stage."""
    built = {}

    def get(stage):
        if stage not in built:
            built[stage] = elastic_runs(tmp_path_factory.mktemp(f"awd{stage}"), [*AWD, f"data.root={ptb_slice}"],
                                        stage)
        return built[stage]
    return get


@pytest.fixture(scope="module", params=[0, 1, 2], ids=lambda s: f"zero{s}")
def awd(request, awd_stages):
    return awd_stages(request.param)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """ZeRO 2 only: the re-cut is the same code at every stage, and the AWD-LSTM covers them all; this adds timm's
    AdamW with its two parameter groups (with and without weight decay)."""
    return elastic_runs(tmp_path_factory.mktemp("vit"), VIT, 2)


@pytest.mark.parametrize("old,new", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_awd_lstm_resumes_on_another_world_size(awd, old, new):
    # valid: the averaged weights; asgd_averaged_steps: the average's count, both carried across the cuts
    assert_continues(awd, old, new, extra=("asgd_averaged_steps",))
    assert records(awd[0])[("train", 6)]["asgd_averaged_steps"] == 6


@pytest.mark.parametrize("old,new", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_vit_resumes_on_another_world_size(vit, old, new):
    assert_continues(vit, old, new)


def test_zero_stages_train_the_same_model_with_every_rank_in_step(awd_stages):
    """Stages 1 and 2 partition the optimizer (and gradients) over the ranks: the model they train is stage 0's,
    every rank holds the same weights, and each rank writes its own optimizer partition."""
    base = records(awd_stages(0)[0])
    for stage in (0, 1, 2):
        ref, chain, _ = awd_stages(stage)
        got = records(ref)
        assert sorted(got) == sorted(base)
        for key in base:
            assert got[key]["loss"] == pytest.approx(base[key]["loss"], rel=1e-4), (stage, key)
        tag = chain / "checkpoints" / "step_00000004"  # written by the 2-rank leg
        digests = {torch.load(tag / f"rank_{r:05d}.pt", weights_only=False)["param_digest"] for r in (0, 1)}
        assert len(digests) == 1, stage
        partitions = sorted(p.name.split("_mp_rank")[0] for p in tag.glob("*optim_states.pt"))
        assert partitions == (["zero_pp_rank_0", "zero_pp_rank_1"] if stage else []), (stage, partitions)


def test_zero2_checkpoint_resumes_on_the_world_size_that_wrote_it(awd_stages, tmp_path):
    """DeepSpeed's own load of its per-rank partitions (no re-cut): the 2-rank leg's step-4 checkpoint, resumed on
    2 ranks, logs what the reference logged for steps 5 and 6."""
    ref, chain, _ = awd_stages(2)
    again = cut(chain, tmp_path / "again", 4)
    out = resume_leg(again, 6, 2)
    assert "resumed from step_00000004 at step 4" in out and "continues on" not in out
    want, got = records(ref), records(again)
    for key in (("train", 5), ("train", 6), ("valid", 6)):
        assert got[key]["loss"] == pytest.approx(want[key]["loss"], rel=1e-5), key
