#!/usr/bin/env python
"""What four past design decisions cost, each timed side by side with what it was chosen over.

Every case builds its alternatives as callables and times them with ``harness.timing.time_side_by_side``: each round
runs every alternative once, back to back, the order reversed every other round, after warm-up rounds that are
dropped. A case's quantity is computed within each round, so a drift in the machine's load between rounds cancels,
and summarised by its median and the distribution-free 95% confidence interval of that median (order statistics; it
narrows with more rounds). Verdict against the case's budget: PASS when the upper end of the CI is within it,
INCONCLUSIVE when the CI is wider than the budget (too noisy to tell: more rounds or a quieter machine), else FAIL.
Timings are comparable within one run only. The script exits 1 unless every case it ran passes.

    python bench/decision_costs.py [--case NAME ...] [--rounds N] [--warmup N]
"""

from __future__ import annotations

import argparse
import inspect
import sys
from dataclasses import dataclass
from itertools import count
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from harness.images import jpeg_like_photo
from harness.paths import DATA_ROOT, cleanup, scratch_dir
from harness.reporting import header, judge, legend, markdown_table, pct, pct_range, progress, verdict
from harness.runs import overrides
from harness.timing import SideBySide, median, summary, time_side_by_side
from recipes.awd_lstm.model import AWDLSTM
from recipes.awd_lstm.regularizers import weight_drop as wd
from recipes.awd_lstm.regularizers.weight_drop import WeightDropLSTM
from recipes.imagenet.data import SampleKey, build_transforms, open_split
from trainer.batching import plan_batch
from trainer.distributed import DistContext
from trainer.nt_asgd.sharded_average import ShardedAverage
from trainer.registry import get_recipe
from trainer.rng import KeyedGenerator, seed_host_rng

CPU = torch.device("cpu")


def cost_cells(costs: list[float], budget: float | None) -> tuple[list, str]:
    """A quantity's table cells (median, 95% CI) and its verdict against ``budget`` (None: not budgeted)."""
    mid, lo, hi = summary(costs)
    result = "not budgeted" if budget is None else judge(lo, hi, budget)
    return [pct(mid), pct_range(lo, hi)], result


def intro(title: str, doc: str, *settings: str) -> None:
    """A case's opening: its title and settings, then what it measures (its docstring)."""
    print(f"\n=== {title} | " + " | ".join(settings))
    legend(inspect.cleandoc(doc))
    print()


# --- weight drop (issue 2) -------------------------------------------------------------------------------------

WD_SIZES = [(400, 1150), (1150, 1150), (1150, 400)]
WD_T, WD_RATE, WD_BUDGET, WD_BATCHES = 70, 0.5, 0.05, (10, 20)


class WeightDropStacks:
    """The paper's recurrent stack as WeightDropLSTM layers, and as nn.LSTM layers holding copies of their weights."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.wdl = nn.ModuleList(WeightDropLSTM(i, o, weight_drop=WD_RATE) for i, o in WD_SIZES).train()
        self.ref = nn.ModuleList(nn.LSTM(i, o) for i, o in WD_SIZES).train()
        with torch.no_grad():
            for a, b in zip(self.wdl, self.ref):
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(b, f"{name}_l0").copy_(getattr(a, name))
        self.params = list(self.wdl.parameters()) + list(self.ref.parameters())

    def forward(self, variant: str, x: torch.Tensor) -> torch.Tensor:
        for wdl, ref in zip(self.wdl, self.ref):
            if variant == "wdrop":
                x, _ = wdl(x)
            elif variant == "no-wdrop":
                x, _ = wdl(x, weight_drop=0.0)
            elif variant == "nn.LSTM":
                x, _ = ref(x)
            else:  # F.dropout: a fresh per-element bernoulli_ mask on weight_hh, through the same fused op
                zeros = x.new_zeros(1, x.size(1), wdl.hidden_size)
                w_hh = F.dropout(wdl.weight_hh, p=WD_RATE, training=True)
                x, _, _ = wd._lstm(x, (zeros, zeros), [wdl.weight_ih, w_hh, wdl.bias_ih, wdl.bias_hh],
                                   True, 1, 0.0, True, False, False)
        return x

    def step(self, variant: str, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
        """One forward + backward of ``variant`` (gradients cleared first), as a callable to time."""
        def run() -> None:
            for p in self.params:
                p.grad = None
            x.grad = None
            self.forward(variant, x).backward(grad)
        return run

    def check_same_math(self) -> None:
        """no-wdrop and nn.LSTM must compute the same function, or the comparison means nothing."""
        x = torch.randn(5, 2, WD_SIZES[0][0])
        with torch.no_grad():
            torch.testing.assert_close(self.forward("no-wdrop", x), self.forward("nn.LSTM", x), rtol=1e-4, atol=1e-5)


def weight_drop(rounds: int, warmup: int) -> int:
    """What weight drop (DropConnect on weight_hh) costs AWD-LSTM's recurrent stack, on CPU, one thread.

    Forward + backward of the paper's 3-layer stack (400->1150, 1150->1150, 1150->400; T=70) in train mode, for
    batch 10 (per rank at 2 ranks) and 20 (1 rank):

      wdrop      WeightDropLSTM, weight_drop=0.5 (what training runs: DropConnectMask, 16-bit draws thresholded
                 into a reused buffer)
      no-wdrop   the same modules with weight_drop=0 (same parameters, same fused op, no mask)
      nn.LSTM    torch.nn.LSTM layers holding copies of the same weights
      F.dropout  the same layers with weight_hh masked by F.dropout (per-element bernoulli_, a fresh mask each
                 step: the usual way, and this project's first implementation)

      X ms       median over rounds of X's forward + backward
      X/Y        median over rounds of the round's X / Y
      cost       wdrop/no-wdrop - 1 per round: median and 95% CI; budget 5% (the issue's)
    """
    torch.set_num_threads(1)
    intro("weight_drop (issue 2)", weight_drop.__doc__, "torch.set_num_threads(1)", f"T={WD_T} rate={WD_RATE}",
          f"{rounds} rounds after {warmup} warm-up")
    stacks = WeightDropStacks()
    stacks.check_same_math()
    variants = ["wdrop", "no-wdrop", "nn.LSTM", "F.dropout"]
    rows, results = [], []
    for batch in WD_BATCHES:
        x = torch.randn(WD_T, batch, WD_SIZES[0][0], requires_grad=True)
        grad = torch.randn(WD_T, batch, WD_SIZES[-1][1])
        timed = time_side_by_side({v: stacks.step(v, x, grad) for v in variants}, rounds, warmup,
                                  label=f"weight_drop batch {batch}")
        cells, result = cost_cells([q - 1 for q in timed.ratios("wdrop", "no-wdrop")], WD_BUDGET)
        results.append(result)
        ratios = [median(timed.ratios(a, b))
                  for a, b in (("wdrop", "no-wdrop"), ("wdrop", "nn.LSTM"), ("F.dropout", "no-wdrop"))]
        rows.append([batch, *(1e3 * timed.median(v) for v in variants), *ratios, *cells, result])
    print(markdown_table(["batch", *(f"{v} ms" for v in variants), "wdrop/no-wdrop", "wdrop/nn.LSTM",
                          "F.dropout/no-wdrop", "cost", "cost, 95% CI", "verdict"], rows))
    return verdict(f"weight drop over no-wdrop, upper end of the 95% CI within {WD_BUDGET:.0%}", results)


# --- masks drawn for the global batch (issue 12) ---------------------------------------------------------------

SD_GLOBAL, SD_BPTT, SD_VOCAB, SD_DRAWS, SD_BUDGET = 20, 70, 10000, 25, 0.02


def shared_draws(rounds: int, warmup: int) -> int:
    """What drawing AWD-LSTM's dropout masks for the global batch costs a rank, against drawing them for its own
    columns, on CPU, two threads.

    Every rank draws each step's masks for the whole global batch from a generator keyed by the step (so any world
    size trains the same run) and takes its columns; before, each rank drew masks for its own columns from its own
    stream. The paper's PTB model (3 layers, 400/1150, vocabulary 10,000, BPTT 70), one rank's share at 2 ranks
    (10 of 20 columns) and at 8 ranks (3 of 20). A round times:

      step       forward + backward of the share in train mode (masks drawn inside, as a rank did before)
      own        25 draws of every mask of a step for the share's columns, from the global generator
      shared     25 draws of them for all 20 columns from a KeyedGenerator keyed by the step, the share cut out

      cost       per round (shared - own) / 25 / step: median and 95% CI; budget 2% of a step
    """
    torch.set_num_threads(2)
    intro("shared_draws (issue 12)", shared_draws.__doc__, "torch.set_num_threads(2)",
          f"{rounds} rounds after {warmup} warm-up, {SD_DRAWS} draws per round")
    torch.manual_seed(0)
    model = AWDLSTM(SD_VOCAB, 400, 1150, 3).train()
    keyed, keys = KeyedGenerator(141, CPU), count()
    rows, results = [], []
    for columns in (10, 3):
        tokens = torch.randint(0, SD_VOCAB, (SD_BPTT, columns))

        def step() -> None:
            model.zero_grad(set_to_none=True)
            model.decoder(model(tokens).output).logsumexp(-1).mean().backward()

        def own() -> None:
            for _ in range(SD_DRAWS):
                model.draw_masks(columns, torch.default_generator)

        def shared() -> None:
            for _ in range(SD_DRAWS):
                model.draw_masks(SD_GLOBAL, keyed.at(next(keys))).columns(slice(0, columns))

        timed = time_side_by_side({"step": step, "own": own, "shared": shared}, rounds, warmup,
                                  label=f"shared_draws {columns} columns")
        cells, result = cost_cells(timed.per_round(lambda t: (t["shared"] - t["own"]) / SD_DRAWS / t["step"]),
                                   SD_BUDGET)
        results.append(result)
        rows.append([f"{columns} of {SD_GLOBAL}", 1e3 * timed.median("step"), 1e3 * timed.median("own") / SD_DRAWS,
                     1e3 * timed.median("shared") / SD_DRAWS, *cells, result])
    print(markdown_table(["columns on this rank", "step ms", "own draws ms", "shared draws ms", "cost",
                          "cost, 95% CI", "verdict"], rows))
    return verdict(f"shared draws, upper end of the 95% CI within {SD_BUDGET:.0%} of a step", results)


# --- NT-ASGD's running average (issue 3) -----------------------------------------------------------------------

ASGD_BUDGET = 0.02


def awd_training_step() -> tuple[nn.Module, Callable[[], None]]:
    """The awd_ptb recipe's model (paper shape) and one of its training steps as a callable: real PTB tokens, rank
    0's 10 columns of the global batch of 20 at 2 ranks, the step's masks drawn for the global batch, forward and
    backward through ``recipe.loss``, gradient clipping, SGD at the step's rescaled learning rate."""
    spec = get_recipe("awd_ptb")
    cfg = spec.load_config([], overrides({"data.root": DATA_ROOT}))
    recipe = spec.factory(cfg, DistContext(0, 1, 0, CPU))
    recipe.setup()
    torch.manual_seed(0)
    model = recipe.build_model().train()
    opt = recipe.build_optimizer(model)
    plan = plan_batch(cfg.data.batch_size, 2, 0, rank=0, uneven=True)
    data = recipe.train_data(plan)
    steps = (ts for epoch in count() for ts in data.steps(epoch))
    taken = count()

    def step() -> None:
        ts = next(steps)
        for group in opt.param_groups:
            group["lr"] = cfg.optim.lr * ts.lr_scale
        context = recipe.begin_step(model, next(taken), 0.0, data)
        opt.zero_grad(set_to_none=True)
        for micro in ts.micro_batches:
            plan.weighted_loss(recipe.loss(model, micro, context)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip)
        opt.step()

    return model, step


def averaging_update(average: ShardedAverage) -> Callable[[], None]:
    """The update NT-ASGD runs after every optimizer step once averaging starts (weight 1/n: a uniform mean)."""
    n = count(1)
    return lambda: average.update(1.0 / next(n))


def memory_rows(model: nn.Module) -> list[list]:
    """Each rank's averaged copy (ShardedAverage.buffer) against the parameters' size at N = 1, 2, 4, 8 ranks."""
    nparams, rows = sum(p.numel() for p in model.parameters()), []
    for world in (1, 2, 4, 8):
        shards = [ShardedAverage(model, DistContext(r, world, r, CPU)).buffer for r in range(world)]
        biggest = max(s.numel() * s.element_size() for s in shards)
        rows.append([world, f"{nparams * 4 / 2**20:.1f}", f"{biggest / 2**20:.2f}", f"{biggest / (nparams * 4):.4f}",
                     f"{1 / world:.4f}", "yes" if sum(s.numel() for s in shards) == nparams else "no"])
    return rows


def asgd(rounds: int, warmup: int) -> int:
    """What NT-ASGD's running average costs a training step, and what it holds per rank.

    The awd_ptb recipe's training step (paper shape, real PTB tokens, one thread, rank 0's 10 columns of the
    global batch of 20 at 2 ranks: train_data, begin_step, recipe.loss, clip, SGD) against the averaging update
    that follows every optimizer step once averaging starts. Budgeted on the largest average a rank can hold, the
    whole model (1 rank); the shards of a 2-rank average (rank 0 holds mostly the embedding, rank 1 the LSTM tail)
    are timed in the same rounds, not budgeted (each is part of the whole).

      step ms     median of the steps
      update ms   median of the update alone
      cost        per round update / step (what the update adds to the step it follows): median and 95% CI;
                  budget 2% for the whole model

    Memory: the largest per-rank averaged copy (ShardedAverage.buffer) against the parameters, at N ranks.
    """
    torch.set_num_threads(1)
    intro("asgd (issue 3)", asgd.__doc__, "torch.set_num_threads(1)", "shape paper",
          f"{rounds} rounds after {warmup} warm-up")
    model, step = awd_training_step()
    averages = {"1 rank": ShardedAverage(model, DistContext(0, 1, 0, CPU)),
                **{f"2 ranks, rank {r}": ShardedAverage(model, DistContext(r, 2, r, CPU)) for r in (0, 1)}}
    timed = time_side_by_side({"step": step, **{k: averaging_update(a) for k, a in averages.items()}}, rounds, warmup,
                              label="asgd")
    rows, results = [], []
    for key, average in averages.items():
        cells, result = cost_cells(timed.ratios(key, "step"), ASGD_BUDGET if key == "1 rank" else None)
        if key == "1 rank":
            results.append(result)
        rows.append([key, f"{average.buffer.numel():,}", 1e3 * timed.median("step"), 1e3 * timed.median(key),
                     *cells, result])
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters")
    print(markdown_table(["average", "values on this rank", "step ms", "update ms", "cost", "cost, 95% CI",
                          "verdict"], rows))
    print()
    print(markdown_table(["ranks N", "fp32 parameters MiB", "largest per-rank average MiB", "fraction", "1/N",
                          "shards cover the parameters exactly"], memory_rows(model)))
    return verdict(f"averaging update against the step, upper end of the 95% CI within {ASGD_BUDGET:.0%}", results)


# --- per-sample augmentation seeding (issue 6) -----------------------------------------------------------------

AUG_WIDTH, AUG_HEIGHT, AUG_SIZE, AUG_IMAGES, AUG_BUDGET = 500, 375, 224, 32, 0.02


@dataclass
class SeedingRounds:
    """One image read seeded and unseeded per round, every image in turn, a new epoch (new augmentations) after
    each pass over them. Before the unseeded read the streams are seeded, untimed, to what the seeded read seeds
    them to: both draw the same crop and RandAugment ops, and the difference is the seeding alone."""

    split: Dataset
    rounds: int
    warmup: int
    key: SampleKey = SampleKey(0, 0, 0)

    def pick(self, r: int) -> None:
        self.key = SampleKey(r % AUG_IMAGES, 0, r // AUG_IMAGES)

    def seed(self) -> None:
        seed_host_rng(self.key.augmentation_seed())

    def run(self) -> SideBySide:
        alternatives = {"seeded": lambda: self.split[self.key], "unseeded": lambda: self.split[self.key.index],
                        "seeding alone": self.seed}
        return time_side_by_side(alternatives, self.rounds, self.warmup, prepare={"unseeded": self.seed},
                                 before_round=self.pick)


class InWorker(Dataset):
    """One item, whose reading times the rounds inside the process that reads it: a DataLoader worker."""

    def __init__(self, rounds: SeedingRounds) -> None:
        self.rounds = rounds

    def __len__(self) -> int:
        return 1

    def __getitem__(self, _: int) -> SideBySide:
        return self.rounds.run()


def augment_seeding(rounds: int, warmup: int) -> int:
    """What seeding each training sample's augmentation costs (it makes the ImageNet loaders resume exactly),
    against decoding and transforming the image without it.

    FolderSplit.__getitem__ with a SampleKey (training: augment seeds python's, numpy's and torch's CPU streams
    from mix_seeds(seed, epoch, index, 4) before the transform) against the same call with a plain index (no
    seeding), on 32 generated 500x375 JPEGs (quality 90) read from disk, through the training transform
    (RandomResizedCrop to 224 px, flip, RandAugment rand-m9-mstd0.5-inc1, to uint8). A round reads one image both
    ways, with the streams seeded untimed before the unseeded read so that both draw the same augmentation; the
    images in turn, a new epoch every pass; 60 passes (1,920 rounds) after one pass of warm-up.

      loader worker       timed inside a DataLoader worker process, as training runs with data.workers >= 1 (the
                          default): seeding the streams is all it adds
      training process    timed in the main process, as with data.workers=0: the training process's own streams
                          (dropout's, mixup's) are also saved and put back around the transform; not budgeted
      unseeded us         median: decode + transform
      seeded us           median: decode + seeding + transform
      seeding alone us    median of the seed derivation and seeding of the three streams, timed on its own
      cost                per round seeded / unseeded - 1: median and 95% CI; budget 2% in a loader worker
    """
    intro("augment_seeding (issue 6)", augment_seeding.__doc__,
          f"{AUG_IMAGES} JPEGs {AUG_WIDTH}x{AUG_HEIGHT} -> {AUG_SIZE} px", f"{rounds} rounds after {warmup} warm-up")
    root = scratch_dir("seeding-")
    try:
        rng, d = np.random.default_rng(0), root / "train" / "n00000000"
        d.mkdir(parents=True)
        for i in range(AUG_IMAGES):
            jpeg_like_photo(rng, AUG_WIDTH, AUG_HEIGHT).save(d / f"{i:05d}.JPEG", quality=90)
        seeding = SeedingRounds(open_split(root, "train", build_transforms(AUG_SIZE, True)), rounds, warmup)
        places = {"loader worker": next(iter(DataLoader(InWorker(seeding), batch_size=None, num_workers=1)))}
        progress("augment_seeding: loader worker done")
        places["training process"] = seeding.run()
    finally:
        cleanup(root)
    rows, results = [], []
    for place, timed in places.items():
        budgeted = place == "loader worker"
        cells, result = cost_cells([q - 1 for q in timed.ratios("seeded", "unseeded")], AUG_BUDGET if budgeted else None)
        if budgeted:
            results.append(result)
        rows.append([place, *(1e6 * timed.median(k) for k in ("unseeded", "seeded", "seeding alone")), *cells, result])
    print(markdown_table(["where", "unseeded us", "seeded us", "seeding alone us", "cost", "cost, 95% CI", "verdict"],
                         rows))
    return verdict(f"per-sample seeding in a loader worker, upper end of the 95% CI within {AUG_BUDGET:.0%}", results)


# --- the cases ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    run: Callable[[int, int], int]  # (rounds, warm-up rounds) -> exit status
    rounds: int
    warmup: int


CASES = {
    "weight_drop": Case(weight_drop, rounds=16, warmup=2),
    "shared_draws": Case(shared_draws, rounds=8, warmup=1),
    "asgd": Case(asgd, rounds=30, warmup=2),
    "augment_seeding": Case(augment_seeding, rounds=60 * AUG_IMAGES, warmup=AUG_IMAGES),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", choices=[*CASES, "all"],
                    help="a case to run (repeatable; default: all)")
    ap.add_argument("--rounds", type=int, help="measured rounds of every case (default: each case's own)")
    ap.add_argument("--warmup", type=int, help="warm-up rounds of every case (default: each case's own)")
    args = ap.parse_args()
    names = list(CASES) if not args.case or "all" in args.case else list(dict.fromkeys(args.case))
    header(f"cases: {', '.join(names)}")
    legend(__doc__)
    failed = []
    for name in names:
        case = CASES[name]
        if case.run(args.rounds or case.rounds, case.warmup if args.warmup is None else args.warmup):
            failed.append(name)
    print(f"\ncases that did not pass: {', '.join(failed)}" if failed else "\nevery case passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
