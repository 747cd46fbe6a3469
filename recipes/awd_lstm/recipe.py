"""AWD-LSTM language modelling on the shared engine (Merity et al. 2017).

Data parallelism splits the global batch's columns: each rank owns a contiguous block of
the batchified stream (blocks differ by at most one column, so any world size trains the same
batch), all ranks draw the same BPTT lengths, and each carries the hidden state of its own columns
across steps (one per micro-batch when accumulating). Every dropout mask of a step is drawn for the
whole global batch from a generator keyed by the step, and each micro-batch takes its columns of it:
the same seed gives the same masks for the same tokens whatever the world size or micro-batch size.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn

from trainer.datasets import ensure_dataset
from trainer.errors import CheckpointError, ConfigError
from trainer.recipe import MicroResult, Recipe, TrainStep
from trainer.rng import KeyedGenerator

from .config import AWDConfig
from .corpus import PTB, WIKITEXT2, BpttSampler, Corpus, batchify, eval_columns, get_batch
from .model import AWDLSTM, AWDMasks
from .pointer import pointer_nll_sum

DATASETS = {"ptb": PTB, "wikitext-2": WIKITEXT2}


class AWDLSTMRecipe(Recipe):
    config_model = AWDConfig
    unit = "tokens"
    default_precision = "fp32"  # the paper's numbers are fp32; SGD at lr 30 is not bf16-safe
    eval_modes = ("standard", "pointer")
    uneven_batches = True  # columns split as evenly as possible; losses weighted by columns

    cfg: AWDConfig

    def setup(self) -> None:
        d = self.cfg.data
        path = ensure_dataset(d.root, DATASETS[d.dataset], verify=d.verify, download=d.download)
        self.corpus = Corpus.from_dir(path)
        self._check_batch_sizes()
        self.sampler = BpttSampler(d.bptt, self.cfg.seed)
        self.hidden: list | None = None  # per micro-batch hidden state, carried across steps
        self.masks: AWDMasks | None = None  # this step's masks for the global batch, until its last micro-batch
        self._eval_cache: dict[str, torch.Tensor] = {}
        if self.plan is not None:
            stream = batchify(self.corpus.train, self.plan.global_batch)
            own = slice(self.plan.offset, self.plan.offset + self.plan.per_rank)
            self.train_data = stream[:, own].contiguous().to(self.ctx.device)
            self.mask_generator = KeyedGenerator(self.cfg.seed, self.ctx.device)
            drop, epochs, steps = self.cfg.drop, self.cfg.train.epochs, self.steps_per_epoch()
            self.drop_schedules = {name: drop.schedule_for(getattr(self.cfg.model, name), epochs, steps)
                                   for name in drop.rates} if drop.mode != "standard" else {}

    def _check_batch_sizes(self) -> None:
        """Each batch size against the split it cuts into columns: a training column needs 3 rows for one step (an
        input row, its target, and the loop's bound), an evaluated one 2. Refused before anything runs, naming the
        largest size the data allows."""
        d, p, c = self.cfg.data, self.cfg.pointer, self.corpus
        checks = [("data.eval_batch_size", d.eval_batch_size, "valid", 2), ("data.test_batch_size", d.test_batch_size,
                  "test", 2), ("pointer.batch_size", p.batch_size, "valid", 2), ("pointer.batch_size", p.batch_size,
                  "test", 2)]
        if self.plan is not None:
            checks.insert(0, ("data.batch_size", d.batch_size, "train", 3))
        for key, size, split, rows in checks:
            tokens = len(getattr(c, split))
            if tokens // size < rows:
                raise ConfigError(f"{key}={size} leaves the {tokens:,} tokens of {d.dataset}'s {split} split "
                                  f"{tokens // size} row(s) per column, too few for one step; the largest {key} "
                                  f"this data allows is {tokens // rows:,}")

    def build_model(self) -> nn.Module:
        m = self.cfg.model
        return AWDLSTM(len(self.corpus.dictionary), m.emsize, m.nhid, m.nlayers, m.dropout, m.dropouth,
                       m.dropouti, m.dropoute, m.wdrop, m.tie_weights)

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        o = self.cfg.optim
        if o.optimizer == "adam":
            return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.wdecay)
        return torch.optim.SGD(model.parameters(), lr=o.lr, weight_decay=o.wdecay)

    def steps_per_epoch(self) -> int:
        bptt = self.cfg.data.bptt
        mean_len = 0.95 * bptt + 0.05 * bptt / 2
        return max(1, math.ceil((self.train_data.size(0) - 2) / mean_len))

    def train_steps(self, epoch: int, position: int | None) -> Iterator[TrainStep]:
        data, bptt, plan = self.train_data, self.cfg.data.bptt, self.plan
        if position is None:
            self.hidden = None  # the paper starts every epoch from a zero state
        i = position or 0
        while i < data.size(0) - 2:
            seq_len = self.sampler.next_len()  # the drawn length sets the step's rate, as the reference's does,
            inputs, targets = get_batch(data, i, seq_len)  # though the epoch's last batch is cut to the rows left
            i += seq_len
            micro = [(k, cols, inputs[:, cols.start - plan.offset:cols.stop - plan.offset],
                      targets[:, cols.start - plan.offset:cols.stop - plan.offset])
                     for k, cols in enumerate(plan.micro_slices())]
            yield TrainStep(micro, units=inputs.size(0) * plan.per_rank, position=i, lr_scale=seq_len / bptt)

    def before_step(self, engine, step: int, epoch: float) -> dict[str, float]:
        """Early / late dropout (``drop.*``): each scheduled rate set on the model, read back for TensorBoard; then
        the step's masks, for the global batch, at those rates."""
        model: AWDLSTM = engine.module
        for name, schedule in self.drop_schedules.items():
            setattr(model, name, schedule.value(step))
        self.masks = model.draw_masks(self.plan.global_batch, self.mask_generator.at(step))
        return {f"drop/{name}": float(getattr(model, name)) for name in self.drop_schedules}

    def micro_loss(self, engine, micro) -> MicroResult:
        """One micro-batch's loss with its columns of the step's masks. Outside a step (the gradient analysis'
        extra forwards) there are none, and the model draws its own from the global generator."""
        k, cols, inputs, targets = micro
        model: AWDLSTM = engine.module
        if self.hidden is None:
            self.hidden = [model.init_hidden(c.stop - c.start) for c in self.plan.micro_slices()]
        masks = None if self.masks is None else self.masks.columns(cols)
        if k == self.plan.accumulation - 1:
            self.masks = None
        out = engine(inputs, self.hidden[k], masks=masks)
        self.hidden[k] = AWDLSTM.detach_hidden(out.hidden)
        loss, ce = model.loss(out, targets, self.cfg.model.alpha, self.cfg.model.beta)
        return MicroResult(loss, {"loss": ce}, size=cols.stop - cols.start)

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

    def state_dict(self) -> dict:
        return {"bptt_sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "bptt_sampler" in state:
            self.sampler.load_state_dict(state["bptt_sampler"])

    def rank_state_dict(self) -> dict:
        hidden = None if self.hidden is None else [[(h.cpu(), c.cpu()) for h, c in hs] for hs in self.hidden]
        return {"hidden": hidden}

    def load_rank_state_dict(self, state: dict) -> None:
        hidden = state.get("hidden")
        dev = self.ctx.device
        self.hidden = None if hidden is None else [[(h.to(dev), c.to(dev)) for h, c in hs] for hs in hidden]

    def load_rank_states(self, states: list[dict]) -> None:
        """Re-split the carried hidden states by column: laid side by side (old rank, then micro-batch) they are
        the global batch's columns, of which this rank now owns a block, cut into its micro-batches."""
        parts = [s.get("hidden") for s in states]
        if any(p is None for p in parts):  # saved at an epoch's start: nothing carried
            self.hidden = None
            return
        micro = [m for part in parts for m in part]
        layers = [[torch.cat([m[layer][j] for m in micro], dim=1) for j in (0, 1)] for layer in range(len(micro[0]))]
        plan, dev = self.plan, self.ctx.device
        if layers[0][0].size(1) != plan.global_batch:
            raise CheckpointError(f"the checkpoint carries hidden states of {layers[0][0].size(1)} columns but "
                                  f"data.batch_size is {plan.global_batch}; resume with the global batch it was "
                                  "written with")
        self.hidden = [[(h[:, cols].to(dev), c[:, cols].to(dev)) for h, c in layers] for cols in plan.micro_slices()]

    def checkpoint_signature(self) -> dict:
        m = self.cfg.model
        return {
            "vocabulary": f"{len(self.corpus.dictionary)} words, digest {self.corpus.vocab_digest()}",
            "model shape": f"emsize {m.emsize}, nhid {m.nhid}, nlayers {m.nlayers}, tied {m.tie_weights}",
        }
