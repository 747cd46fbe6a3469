"""The one training loop every recipe runs on, built on ``deepspeed.initialize``."""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch.optim.lr_scheduler import LambdaLR

from .batching import plan_batch
from .builtin_callbacks import build_callbacks
from .callbacks import Loop
from .checkpoint import (BEST, Checkpointer, agree_on_resume_tag, check_signature, load_weights, read_client_state,
                         read_latest_tag, resolve_tag, step_tag)
from .deepspeed_engine import build_engine, choose_precision
from .distributed import DistContext, all_reduce_sums, barrier
from .errors import CheckpointError, ConfigError, UserError
from .evaluation import evaluate_split
from .faults import PreemptionSignals, StepGate, StepVerdict, agree_on_step, preemption
from .monitor import Monitor
from .rng import seed_everything
from .rundir import RunDir

if TYPE_CHECKING:
    from .callbacks import Callback
    from .config import RecipeConfig
    from .recipe import Recipe, TrainData
    from .registry import RecipeSpec

log = logging.getLogger("trainer")


class TrainingError(UserError):
    pass


@dataclass
class LoopState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epochs completed
    steps_in_epoch: int = 0
    best: float | None = None  # the best validation value of the recipe's best_metric so far
    last_eval_step: int = -1
    last_ckpt_step: int = -1
    skipped_steps: int = 0  # steps whose update was vetoed for a non-finite loss (train.on_nonfinite=skip)
    consecutive_skips: int = 0


class Trainer:
    """The loop: a recipe's model, loss and data stream on DeepSpeed's engine, with the callbacks the run's config
    turns on (``callbacks``: a caller's own, after those) around it."""

    def __init__(self, spec: RecipeSpec, cfg: RecipeConfig, ctx: DistContext, run_dir: RunDir, resume: bool,
                 callbacks: list[Callback] = ()):
        self.spec, self.cfg, self.ctx, self.run_dir = spec, cfg, ctx, run_dir
        self.callbacks = build_callbacks(cfg, ctx, list(callbacks))  # first: a start-up fault fires here
        if spec.requires_init and not resume and not cfg.train.init_from:
            raise ConfigError(f"recipe {spec.name} continues a trained run: pass --set train.init_from=RUN_DIR "
                              f"(its '{cfg.train.init_checkpoint}' checkpoint is loaded)")
        self.plan = plan_batch(cfg.data.batch_size, ctx.world, cfg.train.micro_batch_size, ctx.rank,
                               spec.factory.uneven_batches)
        self.precision = choose_precision(cfg, spec.factory, ctx)
        self.recipe: Recipe = spec.factory(cfg, ctx)
        self.state = LoopState()

        self.recipe.setup()
        self.data: TrainData = self.recipe.train_data(self.plan)
        # one job per run directory, from before its first write (a resume's cleanup of an interrupted save)
        self.lock = run_dir.lock() if resume and ctx.is_main else None
        self._wrote = False  # the run's config (a new run), or its resumed state loaded (a resume)
        try:
            self._start(resume)
        except BaseException:
            if self.lock is not None and not self._wrote:
                self.lock.abandon()  # refused before anything was written: the directory is as it was
            raise

    def _start(self, resume: bool) -> None:
        cfg, ctx, run_dir = self.cfg, self.ctx, self.run_dir
        resume_tag = agree_on_resume_tag(run_dir.checkpoints, ctx) if resume else None
        if resume_tag:  # before anything is written: a refused resume leaves the run as it was
            self._check_compatible(read_client_state(run_dir.checkpoints, resume_tag), resume_tag)
        self.init_tag = init_tag = None
        if cfg.train.init_from and not resume_tag:  # likewise, a refused source creates no run directory
            self.init_tag = init_tag = self._check_init_source(cfg.train.init_from, cfg.train.init_checkpoint)
        seed_everything(cfg.seed)  # identical initial weights whatever the world size
        model = self.recipe.build_model()  # before the run directory: a refused model (model.name) leaves none
        model = self.recipe.for_training(model, self.data)
        if init_tag:
            load_weights(model, RunDir(cfg.train.init_from).checkpoints, init_tag)
            log.info("initialized weights from %s checkpoint %s", cfg.train.init_from, init_tag)
        if ctx.is_main and not resume:
            self.lock = run_dir.lock()  # creates the directory: nothing was refused so far
            run_dir.write_config(cfg)
            self._wrote = True
        barrier(ctx)
        self.callbacks.on_model(model)  # before DeepSpeed: the fp32 initialization
        optimizer = self.recipe.build_optimizer(model)
        self.gate = StepGate(optimizer)  # DeepSpeed's wrappers and the scheduler's step tracking call through it
        self.scheduler = LambdaLR(optimizer, self._lr_factor)
        self.engine, self.clipper = build_engine(model, optimizer, self.scheduler, cfg, self.plan, self.precision, ctx)
        seed_everything(cfg.seed + 1000003 * ctx.rank)  # per-rank streams (timm's dropout, mixup; AWD-LSTM keys its own)
        self.monitor = Monitor(run_dir, ctx, tensorboard=True)
        self.ckpt = Checkpointer(self.engine, run_dir.checkpoints, ctx, cfg.train.keep_last)
        self.callbacks.on_start(Loop(cfg, ctx, self.recipe, self.data, self.engine.module, self.monitor))
        self._stop_requested = False
        self.preempted: str | None = None
        if resume_tag:
            self._resume(resume_tag)
            self._wrote = True
            if ctx.is_main:  # only once the resumed state has loaded: a failed resume leaves the run as it was
                run_dir.write_config(cfg)
        self.preemption = PreemptionSignals()

    def _lr_factor(self, step: int) -> float:
        return self.recipe.lr_factor(step, self.data)

    # ----------------------------------------------------------------- checkpoints
    def _check_compatible(self, saved: dict, tag: str) -> None:
        trainer = saved.get("trainer", {})
        if trainer.get("recipe") not in (None, self.spec.name):
            raise CheckpointError(
                f"checkpoint {tag} belongs to recipe '{trainer['recipe']}', not '{self.spec.name}'; "
                "resume it with its own recipe"
            )
        check_signature(self.recipe.checkpoint_signature(), saved, tag)

    def _check_init_source(self, source: str, which: str) -> str:
        """The tag of ``source`` to start from, verified and of this recipe's vocabulary and shape."""
        ckpt_dir = RunDir(source).checkpoints
        tag = resolve_tag(ckpt_dir, which)
        check_signature(self.recipe.checkpoint_signature(), read_client_state(ckpt_dir, tag), f"{source}:{tag}")
        return tag

    def save(self, tag: str | None = None) -> None:
        tag = tag or step_tag(self.state.step)
        if tag != BEST:
            self.state.last_ckpt_step = self.state.step
        trainer_state = {**asdict(self.state), "recipe": self.spec.name, "world": self.ctx.world}
        self.ckpt.save(tag, trainer_state, self.data, self.callbacks, self.recipe.checkpoint_signature())
        log.info("saved checkpoint %s at step %d", tag, self.state.step)

    def _resume(self, tag: str) -> None:
        """Continue from ``tag``: the checkpointer restores the engine, the data stream, the callbacks and the RNG
        streams (on this world size or another) and hands back the loop's saved state."""
        for k, v in self.ckpt.restore(tag, self.data, self.callbacks, self.plan.global_batch).items():
            if hasattr(self.state, k):
                setattr(self.state, k, v)
        log.info("resumed from %s at step %d (epoch %d)", tag, self.state.step, self.state.epoch)

    # ----------------------------------------------------------------- evaluation
    def evaluate(self, split: str) -> dict[str, float]:
        return evaluate_split(self.recipe, self.engine.module, split, self.ctx, extra=self.data.report())

    def _validate(self, observe: bool = True) -> None:
        """Validate (with the callbacks' evaluation weights, e.g. an average), keep 'best' and (``observe``: not
        the baseline of loaded weights) let the callbacks see the score."""
        s = self.state
        s.last_eval_step = s.step
        with self.callbacks.eval_weights():
            metrics = self.evaluate("valid")
            diverged = sorted(k for k, v in metrics.items() if not math.isfinite(v))
            score = metrics[self.recipe.best_metric]
            if not diverged and self.recipe.improves(score, s.best):
                s.best = score
                self.save(BEST)
        if diverged:  # never 'best', never a checkpoint: the record (valid JSON), then the end of the run
            self.monitor.record("valid", s.step, self._epoch_progress(), metrics)
            kept = read_latest_tag(self.run_dir.checkpoints)
            where = f"the last good checkpoint, {kept}, and best are kept" if kept else "none was saved before"
            raise TrainingError(
                f"validation {' and '.join(diverged)} {'is' if len(diverged) == 1 else 'are'} nan or inf at step "
                f"{s.step}: the weights have diverged and are not saved ({where}): lower optim.lr or raise "
                f"optim.clip, then {'--resume' if kept else 'start again'}")
        verdict = self.callbacks.on_validate(metrics, s.step) if observe else None
        self._stop_requested |= verdict is not None and verdict.stop
        self.monitor.record("valid", s.step, self._epoch_progress(), metrics, verdict.fields if verdict else {})
        self.monitor.console(f"step {s.step} valid", metrics)

    def _test_best(self) -> None:
        if not (self.run_dir.checkpoints / BEST).is_dir():
            return
        self.ckpt.load(BEST, module_only=True)
        metrics = self.evaluate("test")
        self.monitor.record("test", self.state.step, self._epoch_progress(), metrics, {"checkpoint": BEST})
        self.monitor.console("test (best checkpoint)", metrics)

    # ----------------------------------------------------------------- training
    def _epoch_progress(self) -> float:
        per = self.data.steps_per_epoch()
        return self.state.epoch + (self.state.steps_in_epoch / per if per else 0.0)

    def _set_lr(self, scale: float) -> tuple[float, float]:
        """Set the step's learning rate: the schedule's, times the step's own scale (e.g. AWD-LSTM's BPTT rescale).
        Returns (scheduled, applied) as ``optim.lr`` sees them."""
        factor = self._lr_factor(self.state.step)
        for group, base in zip(self.scheduler.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor * scale
        return self.cfg.optim.lr * factor, self.cfg.optim.lr * factor * scale

    def _log_train(self, window: dict, lr: tuple[float, float]) -> None:
        """One ``train`` record for the window; ``lr``: the (scheduled, applied) rate of its last step."""
        elapsed = max(time.perf_counter() - window.pop("_t0"), 1e-9)
        sums = all_reduce_sums({k: float(v) for k, v in window.items()}, self.ctx)
        n = sums.pop("_weight")
        units = sums.pop("_units")
        metrics = self.recipe.train_metrics({k: v / n for k, v in sums.items()}) if n else {}
        rate = {f"{self.recipe.unit}_per_s": units / elapsed}
        s = self.state
        scalars = self.callbacks.scalars()
        extra = {**rate, **{k.replace("/", "_"): v for k, v in scalars.items()}}
        if s.skipped_steps:
            extra["skipped_steps"] = s.skipped_steps
        extra.update(self.callbacks.record_fields())
        extra["lr_applied"] = lr[1]
        self.monitor.record("train", s.step, self._epoch_progress(), {**metrics, "lr": lr[0]}, extra)
        self.monitor.scalars(s.step, {**{f"perf/{k}": v for k, v in rate.items()}, **scalars})
        self.monitor.console(f"step {s.step} epoch {self._epoch_progress():.2f}", {**metrics, "lr": lr[0], **rate})
        if self._bar is not None:
            self._bar.set_postfix({k: _short(v) for k, v in {**metrics, **rate}.items()})

    def _step(self, ts, window: dict) -> tuple[tuple[float, float], StepVerdict]:
        """One optimizer step over the step's micro-batches; returns its (scheduled, applied) learning rate and what
        the ranks agreed on before the update (a non-finite loss anywhere vetoes it, a signal anywhere preempts)."""
        recipe, engine, s = self.recipe, self.engine, self.state
        lr = self._set_lr(ts.lr_scale)
        step = recipe.begin_step(engine.module, s.step, self._epoch_progress(), self.data)
        self.monitor.scalars(s.step + 1, step.scalars)
        self.callbacks.before_step(s.step + 1)
        finite = torch.ones((), dtype=torch.bool, device=self.ctx.device)
        step_metrics: dict = {}  # per-micro means, weighted by their sizes
        step_weight = 0.0
        last = len(ts.micro_batches) - 1
        for k, micro in enumerate(ts.micro_batches):
            out = recipe.loss(engine.module, micro, step)  # on the module: DeepSpeed runs the backward and step
            loss = self.callbacks.on_loss(self.plan.weighted_loss(out), s.step + 1)
            finite &= torch.isfinite(loss.detach()).all()
            weight = 1.0 if out.size is None else float(out.size)
            engine.backward(loss)
            if k == last:  # after every backward, before DeepSpeed applies the update
                norm = self.clipper.clip() if self.clipper is not None else None
                verdict = agree_on_step(self.ctx, self.preemption.received, finite, norm)
                self.gate.closed = verdict.vetoed
            engine.step()
            for name, v in out.metrics.items():
                step_metrics[name] = step_metrics.get(name, 0.0) + v.detach().float() * weight
            step_weight += weight
        self.gate.closed = False
        window["_units"] += ts.units
        s.step += 1
        s.steps_in_epoch += 1
        if verdict.vetoed:
            self._skip_nonfinite(verdict)
        else:
            s.consecutive_skips = 0
            for name, v in step_metrics.items():
                window[name] = window.get(name, 0.0) + v
            window["_weight"] += step_weight
        self.callbacks.after_step(s.step, applied=not verdict.vetoed)
        return lr, verdict

    def _skip_nonfinite(self, verdict: StepVerdict) -> None:
        """The update was vetoed on every rank: the weights and optimizer state are those of the last step."""
        s = self.state
        policy = self.cfg.train.on_nonfinite
        s.skipped_steps += 1
        s.consecutive_skips += 1
        self.monitor.scalars(s.step, {"train/skipped_steps": s.skipped_steps})
        kept = read_latest_tag(self.run_dir.checkpoints) or "none yet"
        rank = verdict.nonfinite_rank
        if policy == "stop":
            cause = (f"the gradient norm is nan or inf at step {s.step}" if rank is None
                     else f"training loss is nan or inf at step {s.step} (rank {rank})")
            raise TrainingError(
                f"{cause}; stopped without applying that step, the last good checkpoint ({kept}) is kept: lower "
                "optim.lr or raise optim.clip, or set train.on_nonfinite=skip, then --resume")
        if s.consecutive_skips > self.cfg.train.max_consecutive_skips:
            raise TrainingError(
                f"training loss or gradient was nan or inf for {s.consecutive_skips} steps in a row up to step "
                f"{s.step}; the run has diverged, the last good checkpoint ({kept}) is kept: lower optim.lr or raise "
                "optim.clip, then --resume")
        log.warning("step %d: %s: update skipped, %d skipped so far (train.on_nonfinite=skip)", s.step,
                    "gradient norm is nan or inf" if rank is None else f"loss is nan or inf (rank {rank})",
                    s.skipped_steps)

    def _done(self) -> bool:
        max_steps = self.cfg.train.max_steps
        return self._stop_requested or self.preempted is not None or bool(max_steps and self.state.step >= max_steps)

    def fit(self) -> LoopState:
        """Train to the end, or to a preemption checkpoint. (A failure, this rank's or a peer's, ends the job
        through ``trainer.cli.guarded`` and the watchdog; the signal handlers stay until then, so a launcher's
        SIGTERM that follows a peer's death cannot end this rank before it has said what happened.)"""
        try:
            state = self._fit()
        finally:
            self.monitor.flush()  # what was written since the last record, whatever ended the run
            if self.lock is not None:
                self.lock.release()  # the run directory is free for the next job (a resume, another process)
        self.preemption.close()
        return state

    def _fit(self) -> LoopState:
        cfg, s = self.cfg.train, self.state
        if self.init_tag and s.step == 0 and s.best is None:
            self._validate(observe=False)  # as the reference's finetune.py: the loaded weights are the best so far
        self.engine.module.train()
        window: dict = {}
        self._bar = None
        lr = (self.cfg.optim.lr, self.cfg.optim.lr)
        while not self._done() and s.epoch < cfg.epochs:
            self._open_bar()
            for ts in self.data.steps(s.epoch):
                window = window or {"_t0": time.perf_counter(), "_weight": 0.0, "_units": 0.0}
                lr, verdict = self._step(ts, window)
                if self._bar is not None:
                    self._bar.update(1)
                if s.step % cfg.log_every == 0:
                    self._log_train(window, lr)
                    window = {}
                paused = time.perf_counter()
                if cfg.eval_every and s.step % cfg.eval_every == 0:
                    self._validate()
                if cfg.checkpoint_every and s.step % cfg.checkpoint_every == 0:
                    self.save()
                self.callbacks.on_step_end(s.step)
                if window:  # throughput counts training time only
                    window["_t0"] += time.perf_counter() - paused
                if verdict.preempt:
                    self.preempted = verdict.signal
                    preemption.record_agreed(verdict.signal)
                if self._done():
                    break
            else:
                s.epoch += 1
                s.steps_in_epoch = 0
                if not cfg.eval_every:
                    self._validate()
                if not cfg.checkpoint_every:
                    self.save()
            self._close_bar()
        if window and window.get("_weight"):
            self._log_train(window, lr)
        if self.preempted is not None:
            return self._checkpoint_and_leave()
        if s.last_eval_step != s.step:
            self._validate()
        if s.last_ckpt_step != s.step:
            self.save()
        if cfg.test_at_end:
            self._test_best()
        barrier(self.ctx)
        return s

    def _checkpoint_and_leave(self) -> LoopState:
        """Preempted: one checkpoint of the step every rank agreed on, then out, skipping the end-of-run
        evaluation (the grace period before SIGKILL is short)."""
        s = self.state
        if s.last_ckpt_step != s.step:
            self.save()
        barrier(self.ctx)
        if self.ctx.is_main:
            log.warning("preempted (%s) at step %d: checkpoint %s written; continue with --resume --run-dir %s",
                        self.preempted, s.step, step_tag(s.last_ckpt_step), self.run_dir.path)
        return s

    def _open_bar(self) -> None:
        if self.ctx.is_main and self.cfg.train.progress and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.data.steps_per_epoch(), initial=self.state.steps_in_epoch,
                             desc=f"epoch {self.state.epoch + 1}", unit="step", dynamic_ncols=True, leave=False)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _short(v: float) -> str:
    return f"{v:.4g}"
