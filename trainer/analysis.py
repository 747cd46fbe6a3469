"""Gradient statistics of "Dropout Reduces Underfitting" (Liu et al., 2023) as an opt-in monitor.

Every ``every`` optimizer steps it logs, for any recipe:

* ``analysis/grad_norm``: L2 norm of a (data-parallel averaged) mini-batch gradient, mean over the K batches;
* ``analysis/distance_from_init``: L2 distance of the parameters from their values when the monitor was built;
* ``analysis/grad_direction_variance``: mean pairwise cosine distance between K train-mode mini-batch gradients;
* ``analysis/grad_direction_error``: mean cosine distance between those K gradients and the "ground-truth"
  gradient of S mini-batches computed in inference mode (dropout off), as the paper defines it;
* ``analysis/reference_grad_norm``: the norm of that ground-truth gradient.

The analysis must not perturb training, so gradients come from ``torch.autograd.grad`` on the bare module
(DeepSpeed's gradient buffers, ZeRO hooks and the optimizer never see them) and everything the forward passes
may change (RNG streams, train/eval flags, buffers such as BatchNorm statistics) is restored afterwards.

It attaches to the loop as a callback (:class:`GradientAnalysisCallback`): the initial copy is taken when the
model is built, before ``deepspeed.initialize`` (the fp32 initialization); a fixed analysis set is captured once
from the first steps of the training stream's first epoch, and ``run`` is called on every rank at the same steps (it
all-reduces), after the step's validation and checkpoint. The stream's state (order, position, and what its forwards
carry: an LSTM's hidden state) is put back after both, so training never sees them.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager
from itertools import islice
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .callbacks import Callback, Loop
from .config import AnalysisConfig, RecipeConfig
from .distributed import DistContext
from .errors import ConfigError
from .precision import master_pieces, master_values, uses_masters
from .rng import capture_rng, restore_rng, seed_everything

GradFn = Callable[[Any, bool], torch.Tensor]
"""``grad_fn(micro, train_mode)``: this rank's flat fp32 gradient of one micro-batch's loss (no all-reduce)."""

_DOT_CHUNK = 1 << 24


# ---------------------------------------------------------------------------------------------- helpers
def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The flat layout of every gradient vector here (shared parameters count once, as in ``parameters()``)."""
    return [p for p in module.parameters() if p.requires_grad]


def flat_grad(module: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    """d loss / d params as one fp32 vector, leaving ``.grad`` and any grad-accumulation hooks untouched."""
    params = trainable_parameters(module)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros(p.numel(), dtype=torch.float32, device=p.device) if g is None
                       else g.detach().reshape(-1).float()) for p, g in zip(params, grads)])


def average_over_ranks(vec: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Each rank's gradient of its shard, averaged in place: the global mini-batch gradient on every rank."""
    if ctx.world > 1:
        dist.all_reduce(vec, op=dist.ReduceOp.SUM)
        vec.div_(ctx.world)
    return vec


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """float64 accumulation in chunks: exact enough for cosines near 1 without a 2x-size float64 copy."""
    total = 0.0
    for i in range(0, a.numel(), _DOT_CHUNK):
        total += torch.dot(a[i:i + _DOT_CHUNK].double(), b[i:i + _DOT_CHUNK].double()).item()
    return total


def cosine_distance_stats(unit_sum: torch.Tensor, count: int, reference_unit: torch.Tensor | None
                          ) -> tuple[float, float | None]:
    """Mean pairwise and mean-to-reference cosine distances from the sum of ``count`` unit vectors.

    The Gram matrix of unit vectors u_i sums to ||sum u_i||^2 and its diagonal to ``count``, so the mean of its
    off-diagonal is (||sum u||^2 - count) / (count (count - 1)): the same statistic in O(P) memory instead of
    holding all K gradients.
    """
    off_diagonal = (_dot(unit_sum, unit_sum) - count) / (count * (count - 1))
    variance = 1.0 - off_diagonal
    error = None if reference_unit is None else 1.0 - _dot(unit_sum, reference_unit) / count
    return variance, error


def _unit(vec: torch.Tensor) -> tuple[torch.Tensor, float]:
    norm = _dot(vec, vec) ** 0.5
    return vec / max(norm, 1e-30), norm


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Micro-batches are recipe-defined trees of tensors (dataclasses, tuples, lists, dicts); move every tensor."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_device(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@contextmanager
def preserved_module_state(model: nn.Module) -> Iterator[dict[nn.Module, bool]]:
    """Restore RNG streams, per-module train/eval flags and buffers (BatchNorm statistics) on exit."""
    rng = capture_rng()
    flags = {m: m.training for m in model.modules()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield flags
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, training in flags.items():
            m.training = training
        restore_rng(rng)


@contextmanager
def preserved_stream_state(data) -> Iterator[None]:
    """A training stream's shared and per-rank state (data-order generators, carried hidden state) is put back
    on exit."""
    shared = copy.deepcopy(data.state_dict())
    private = copy.deepcopy(data.rank_state_dict())
    try:
        yield
    finally:
        data.load_state_dict(shared)
        data.load_rank_state_dict(private)


def capture_batches(data, n: int, epoch: int = 0, device: torch.device | str = "cpu") -> list[list[Any]]:
    """The first ``n`` steps' micro-batches of ``data``'s ``epoch``, a fixed analysis set.

    Kept in host memory by default (S mini-batches of images would crowd the accelerator); ``make_grad_fn``
    moves each micro-batch to the device when it is used. RNG and the stream's state are restored afterwards.
    """
    with preserved_stream_state(data):
        rng = capture_rng()
        try:
            steps = data.steps(epoch)
            out = [to_device(ts.micro_batches, device) for ts in islice(steps, n)]
            close = getattr(steps, "close", None)
            if close is not None:
                close()
        finally:
            restore_rng(rng)
    if len(out) < n:
        raise ConfigError(f"gradient analysis needs {n} training steps of epoch {epoch} but it has {len(out)}; "
                          "lower analysis.batches / analysis.reference_batches")
    return out


def make_grad_fn(recipe, module: nn.Module, plan, device: torch.device | str | None = None) -> GradFn:
    """A recipe-agnostic ``grad_fn``: the recipe's own loss outside a step (no step context: the model draws its
    own masks), weighted as ``plan`` weighs it in training, differentiated with ``torch.autograd.grad``."""

    def grad_fn(micro: Any, train_mode: bool) -> torch.Tensor:  # the mode is already set by GradientAnalysis
        if device is not None:
            micro = to_device(micro, device)
        return flat_grad(module, plan.weighted_loss(recipe.loss(module, micro, None)))

    return grad_fn


# ---------------------------------------------------------------------------------------------- monitor
class GradientAnalysis:
    """Snapshots the initial parameters at construction; ``run`` computes the ``analysis/`` scalars."""

    def __init__(self, cfg: AnalysisConfig, model: nn.Module, ctx: DistContext, seed: int = 0):
        self.cfg, self.model, self.ctx, self.seed = cfg, model, ctx, seed
        with torch.no_grad():
            self.initial = [p.detach().to(device="cpu" if cfg.init_on_cpu else p.device, dtype=torch.float32,
                                          copy=True) for p in trainable_parameters(model)]

    def due(self, step: int) -> bool:
        return self.cfg.enabled and step % self.cfg.every == 0

    @torch.no_grad()
    def distance_from_init(self) -> float:
        """From the fp32 weights: under bf16 the masters (each rank sums over the ones it holds, then one
        all-reduce), as the bf16 copies' rounding would dominate small distances."""
        params = trainable_parameters(self.model)
        if len(params) != len(self.initial):
            raise RuntimeError("the model's trainable parameters changed since the gradient analysis was built")
        if uses_masters(params):
            total = torch.zeros((), dtype=torch.float64, device=params[0].device)
            for i, a, b in master_pieces(params, self.ctx.rank):
                p0 = self.initial[i].reshape(-1)[a:b].to(params[i].device, non_blocking=True)
                total += torch.linalg.vector_norm(master_values(params[i], a, b) - p0, dtype=torch.float64) ** 2
            if self.ctx.world > 1:
                dist.all_reduce(total)
            return float(total) ** 0.5
        total = 0.0
        for p, p0 in zip(params, self.initial):
            diff = p.detach().float() - p0.to(p.device, non_blocking=True)
            total += float(torch.linalg.vector_norm(diff, dtype=torch.float64)) ** 2
        return total ** 0.5

    def minibatch_grad(self, grad_fn: GradFn, micro_batches: list[Any], train_mode: bool) -> torch.Tensor:
        """Mean over micro-batches (DeepSpeed's accumulation scaling), then over ranks: the global gradient (uneven
        micro-batches come weighted by their sizes from ``grad_fn``, as in training)."""
        total = None
        for micro in micro_batches:
            g = grad_fn(micro, train_mode)
            total = g if total is None else total.add_(g)
        return average_over_ranks(total.div_(len(micro_batches)), self.ctx)

    def run(self, step: int, grad_fn: GradFn, batches: Iterable[Any]) -> dict[str, float]:
        """The scalars at the current parameters; ``batches`` yields this rank's mini-batches (TrainStep or lists).

        The first K mini-batches give train-mode gradients (the model's flags as training left them, so dropout
        on); the first S give eval-mode gradients (``model.eval()``) whose mean is the ground-truth gradient.
        Dropout masks come from a seed fixed per (seed, step, rank), so an analysis is reproducible and the
        training RNG streams are restored afterwards.
        """
        k, s = self.cfg.batches, self.cfg.reference_batches
        out = {"analysis/distance_from_init": self.distance_from_init()}
        unit_sum, reference, norms, taken = None, None, [], 0
        with preserved_module_state(self.model) as train_flags:
            seed_everything(self.seed + 7919 * step + 1000003 * self.ctx.rank)
            for i, batch in enumerate(islice(batches, max(k, s))):
                micro_batches = getattr(batch, "micro_batches", batch)
                taken += 1
                if i < k:
                    for m, training in train_flags.items():
                        m.training = training
                    u, norm = _unit(self.minibatch_grad(grad_fn, micro_batches, train_mode=True))
                    norms.append(norm)
                    unit_sum = u if unit_sum is None else unit_sum.add_(u)
                if i < s:
                    self.model.eval()
                    g = self.minibatch_grad(grad_fn, micro_batches, train_mode=False)
                    reference = g if reference is None else reference.add_(g)
        if taken < max(k, s):
            raise ValueError(f"gradient analysis needs {max(k, s)} mini-batches, got {taken}")
        reference_unit, reference_norm = _unit(reference.div_(s))
        variance, error = cosine_distance_stats(unit_sum, k, reference_unit)
        out.update({
            "analysis/grad_norm": sum(norms) / k,
            "analysis/grad_direction_variance": variance,
            "analysis/grad_direction_error": error,
            "analysis/reference_grad_norm": reference_norm,
        })
        return out


class GradientAnalysisCallback(Callback):
    """``analysis.enabled``: the analysis every ``analysis.every`` steps, logged to TensorBoard and the console."""

    def __init__(self, cfg: AnalysisConfig, ctx: DistContext, seed: int):
        self.cfg, self.ctx, self.seed = cfg, ctx, seed
        self.analysis: GradientAnalysis | None = None

    @classmethod
    def from_config(cls, cfg: RecipeConfig, ctx: DistContext) -> GradientAnalysisCallback | None:
        return cls(cfg.analysis, ctx, cfg.seed) if cfg.analysis.enabled else None

    def on_model(self, model: nn.Module) -> None:
        self.analysis = GradientAnalysis(self.cfg, model, self.ctx, seed=self.seed)

    def on_start(self, loop: Loop) -> None:
        self.monitor, self.data = loop.monitor, loop.data
        self.batches = capture_batches(loop.data, self.cfg.needed_batches)
        self.grad_fn = make_grad_fn(loop.recipe, loop.module, loop.data.plan, loop.ctx.device)

    def on_step_end(self, step: int) -> None:
        if not self.analysis.due(step):
            return
        with preserved_stream_state(self.data):  # its forwards carry the stream's state on: put back after
            scalars = self.analysis.run(step, self.grad_fn, self.batches)
        self.monitor.scalars(step, scalars)
        self.monitor.console(f"step {step} analysis", scalars)
