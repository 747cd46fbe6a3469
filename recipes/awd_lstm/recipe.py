"""AWD-LSTM language modelling on the shared engine (Merity et al. 2017).

Data parallelism splits the global batch's columns: each rank owns a contiguous block of
the batchified stream (blocks differ by at most one column, so any world size trains the same
batch), all ranks draw the same BPTT lengths, and each carries the hidden state of its own columns
across steps (one per micro-batch when accumulating). Every dropout mask of a step is drawn for the
whole global batch from a generator keyed by the step, and each micro-batch takes its columns of it:
the same seed gives the same masks for the same tokens whatever the world size or micro-batch size.

``TextStream`` is a rank's training stream (its columns, the BPTT draws, the position and the carried hidden
states); the recipe draws a step's masks in ``begin_step`` and hands them to each micro-batch's loss in the step's
context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from trainer.datasets import ensure_dataset
from trainer.errors import CheckpointError, ConfigError
from trainer.recipe import BatchPlan, MicroResult, Recipe, StepContext, TrainData, TrainStep
from trainer.rng import KeyedGenerator

from .config import AWDConfig, AWDDropConfig
from .corpus import PTB, WIKITEXT2, BpttSampler, Corpus, batchify, eval_columns, get_batch
from .model import AWDLSTM
from .pointer import pointer_nll_sum

DATASETS = {"ptb": PTB, "wikitext-2": WIKITEXT2}


@dataclass
class TextMicroBatch:
    """One micro-batch of a step: its columns of the global batch, its rows, and where its hidden state is carried."""

    index: int  # its place among the step's micro-batches (the slot its hidden state is carried in)
    columns: slice  # its columns of the global batch (of the step's masks)
    inputs: torch.Tensor
    targets: torch.Tensor
    carry: HiddenCarry


class HiddenCarry:
    """The LSTM state each micro-batch slot carries from one step to the next (None: zeros, an epoch's start)."""

    def __init__(self, plan: BatchPlan):
        self.plan = plan
        self.slots: list | None = None

    def get(self, model: AWDLSTM, micro: TextMicroBatch):
        if self.slots is None:
            self.slots = [model.init_hidden(c.stop - c.start) for c in self.plan.micro_slices()]
        return self.slots[micro.index]

    def put(self, micro: TextMicroBatch, hidden) -> None:
        self.slots[micro.index] = AWDLSTM.detach_hidden(hidden)


class TextStream(TrainData):
    """This rank's block of columns of the batchified training text, walked in variable-length BPTT steps."""

    def __init__(self, plan: BatchPlan, train: torch.Tensor, bptt: int, seed: int, device: torch.device,
                 drop: AWDDropConfig, rates: dict[str, float], epochs: int):
        super().__init__(plan)
        stream = batchify(train, plan.global_batch)
        own = slice(plan.offset, plan.offset + plan.per_rank)
        self.data = stream[:, own].contiguous().to(device)
        self.bptt = bptt
        self.sampler = BpttSampler(bptt, seed)
        self.position: int | None = None  # the row after the last step taken; None: the epoch's start
        self.carry = HiddenCarry(plan)
        self.device = device
        steps = self.steps_per_epoch()  # early / late dropout (drop.*): each configured rate's schedule over steps
        self.schedules = {name: drop.schedule_for(rates[name], epochs, steps)
                          for name in drop.rates} if drop.mode != "standard" else {}

    def steps_per_epoch(self) -> int:
        mean_len = 0.95 * self.bptt + 0.05 * self.bptt / 2
        return max(1, math.ceil((self.data.size(0) - 2) / mean_len))

    def steps(self, epoch: int) -> Iterator[TrainStep]:
        data, plan = self.data, self.plan
        if self.position is None:
            self.carry.slots = None  # the paper starts every epoch from a zero state
        i = self.position or 0
        while i < data.size(0) - 2:
            seq_len = self.sampler.next_len()  # the drawn length sets the step's rate, as the reference's does,
            inputs, targets = get_batch(data, i, seq_len)  # though the epoch's last batch is cut to the rows left
            i += seq_len
            self.position = i
            micro = [TextMicroBatch(k, cols, inputs[:, cols.start - plan.offset:cols.stop - plan.offset],
                                    targets[:, cols.start - plan.offset:cols.stop - plan.offset], self.carry)
                     for k, cols in enumerate(plan.micro_slices())]
            yield TrainStep(micro, units=inputs.size(0) * plan.per_rank, position=i, lr_scale=seq_len / self.bptt)
        self.position = None

    def state_dict(self) -> dict:
        return {"bptt_sampler": self.sampler.state_dict(), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if "bptt_sampler" in state:
            self.sampler.load_state_dict(state["bptt_sampler"])
        self.position = state.get("position")

    def rank_state_dict(self) -> dict:
        slots = self.carry.slots
        return {"hidden": None if slots is None else [[(h.cpu(), c.cpu()) for h, c in hs] for hs in slots]}

    def load_rank_state_dict(self, state: dict) -> None:
        hidden, dev = state.get("hidden"), self.device
        self.carry.slots = None if hidden is None else [[(h.to(dev), c.to(dev)) for h, c in hs] for hs in hidden]

    def load_rank_states(self, states: list[dict]) -> None:
        """Re-split the carried hidden states by column: laid side by side (old rank, then micro-batch) they are
        the global batch's columns, of which this rank now owns a block, cut into its micro-batches."""
        parts = [s.get("hidden") for s in states]
        if any(p is None for p in parts):  # saved at an epoch's start: nothing carried
            self.carry.slots = None
            return
        micro = [m for part in parts for m in part]
        layers = [[torch.cat([m[layer][j] for m in micro], dim=1) for j in (0, 1)] for layer in range(len(micro[0]))]
        plan, dev = self.plan, self.device
        if layers[0][0].size(1) != plan.global_batch:
            raise CheckpointError(f"the checkpoint carries hidden states of {layers[0][0].size(1)} columns but "
                                  f"data.batch_size is {plan.global_batch}; resume with the global batch it was "
                                  "written with")
        self.carry.slots = [[(h[:, cols].to(dev), c[:, cols].to(dev)) for h, c in layers]
                            for cols in plan.micro_slices()]


class AWDLSTMRecipe(Recipe):
    config_model = AWDConfig
    unit = "tokens"
    default_precision = "fp32"  # the paper's numbers are fp32; SGD at lr 30 is not bf16-safe
    eval_modes = ("standard", "pointer")
    uneven_batches = True  # columns split as evenly as possible; losses weighted by columns

    cfg: AWDConfig

    def setup(self) -> None:
        d, p = self.cfg.data, self.cfg.pointer
        path = ensure_dataset(d.root, DATASETS[d.dataset], verify=d.verify, download=d.download)
        self.corpus = Corpus.from_dir(path)
        self._check_batch_sizes([("data.eval_batch_size", d.eval_batch_size, "valid", 2),
                                 ("data.test_batch_size", d.test_batch_size, "test", 2),
                                 ("pointer.batch_size", p.batch_size, "valid", 2),
                                 ("pointer.batch_size", p.batch_size, "test", 2)])
        self._eval_cache: dict[str, torch.Tensor] = {}
        self.mask_generator = KeyedGenerator(self.cfg.seed, self.ctx.device)

    def _check_batch_sizes(self, checks: list[tuple[str, int, str, int]]) -> None:
        """Each batch size against the split it cuts into columns: a training column needs 3 rows for one step (an
        input row, its target, and the loop's bound), an evaluated one 2. Refused before anything runs, naming the
        largest size the data allows."""
        d, c = self.cfg.data, self.corpus
        for key, size, split, rows in checks:
            tokens = len(getattr(c, split))
            if tokens // size < rows:
                raise ConfigError(f"{key}={size} leaves the {tokens:,} tokens of {d.dataset}'s {split} split "
                                  f"{tokens // size} row(s) per column, too few for one step; the largest {key} "
                                  f"this data allows is {tokens // rows:,}")

    def train_data(self, plan: BatchPlan) -> TextStream:
        d = self.cfg.data
        self._check_batch_sizes([("data.batch_size", d.batch_size, "train", 3)])
        m = self.cfg.model
        return TextStream(plan, self.corpus.train, d.bptt, self.cfg.seed, self.ctx.device, self.cfg.drop,
                          {name: getattr(m, name) for name in self.cfg.drop.rates}, self.cfg.train.epochs)

    def build_model(self) -> nn.Module:
        m = self.cfg.model
        return AWDLSTM(len(self.corpus.dictionary), m.emsize, m.nhid, m.nlayers, m.dropout, m.dropouth,
                       m.dropouti, m.dropoute, m.wdrop, m.tie_weights)

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        o = self.cfg.optim
        if o.optimizer == "adam":
            return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.wdecay)
        return torch.optim.SGD(model.parameters(), lr=o.lr, weight_decay=o.wdecay)

    def begin_step(self, model: AWDLSTM, step: int, epoch: float, data: TextStream) -> StepContext:
        """Early / late dropout (``drop.*``): each scheduled rate set on the model, read back for TensorBoard; then
        the step's masks, for the global batch, at those rates."""
        for name, schedule in data.schedules.items():
            setattr(model, name, schedule.value(step))
        masks = model.draw_masks(data.plan.global_batch, self.mask_generator.at(step))
        return StepContext(step, epoch, draws=masks,
                           scalars={f"drop/{name}": float(getattr(model, name)) for name in data.schedules})

    def loss(self, model: AWDLSTM, micro: TextMicroBatch, step: StepContext | None) -> MicroResult:
        """One micro-batch's loss with its columns of the step's masks. Outside a step (the gradient analysis'
        extra forwards) there are none, and the model draws its own from the global generator."""
        masks = None if step is None or step.draws is None else step.draws.columns(micro.columns)
        out = model(micro.inputs, micro.carry.get(model, micro), masks=masks)
        micro.carry.put(micro, out.hidden)
        loss, ce = model.loss(out, micro.targets, self.cfg.model.alpha, self.cfg.model.beta)
        return MicroResult(loss, {"loss": ce}, size=micro.columns.stop - micro.columns.start)

    def _eval_stream(self, split: str, bsz: int) -> torch.Tensor:
        """This rank's columns of the split batchified at ``bsz`` (the paper: 10 for valid, 1 for test)."""
        key = f"{split}/{bsz}"
        if key not in self._eval_cache:
            cols = eval_columns(bsz, self.ctx.rank, self.ctx.world)
            stream = batchify(getattr(self.corpus, split), bsz)
            self._eval_cache[key] = stream[:, cols.start:cols.stop].to(self.ctx.device)
        return self._eval_cache[key]

    def evaluate(self, model: nn.Module, split: str, mode: str = "standard") -> dict[str, float]:
        d, p = self.cfg.data, self.cfg.pointer
        if mode == "pointer":
            src = self._eval_stream(split, p.batch_size)
            if src.size(1) == 0:
                return {"nll": 0.0, "tokens": 0.0}
            nll, tokens = pointer_nll_sum(model, src, p.chunk, p.window, p.theta, p.lambdah, p.skip_until_full)
            return {"nll": nll, "tokens": float(tokens)}
        src = self._eval_stream(split, d.eval_batch_size if split == "valid" else d.test_batch_size)
        if src.size(1) == 0:
            return {"nll": 0.0, "tokens": 0.0}
        nll = torch.zeros((), dtype=torch.float64, device=src.device)
        bptt = self.cfg.data.bptt
        hidden = model.init_hidden(src.size(1))
        for i in range(0, src.size(0) - 1, bptt):
            inputs, targets = get_batch(src, i, bptt)
            out = model(inputs, hidden)
            hidden = out.hidden
            nll += model.token_nll_sum(out, targets)
        tokens = (src.size(0) - 1) * src.size(1)
        return {"nll": nll.item(), "tokens": float(tokens)}

    def finalize_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        loss = sums["nll"] / sums["tokens"]
        return {"loss": loss, "ppl": math.exp(loss) if loss < 700 else math.inf}  # past e^700: diverged, not a ppl

    def train_metrics(self, means: dict[str, float]) -> dict[str, float]:
        return {**means, "ppl": math.exp(min(means["loss"], 700.0))}

    def checkpoint_signature(self) -> dict:
        m = self.cfg.model
        return {
            "vocabulary": f"{len(self.corpus.dictionary)} words, digest {self.corpus.vocab_digest()}",
            "model shape": f"emsize {m.emsize}, nhid {m.nhid}, nlayers {m.nlayers}, tied {m.tie_weights}",
        }
