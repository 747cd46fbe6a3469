"""The one training loop every recipe runs on, built on ``deepspeed.initialize``."""

from __future__ import annotations

import logging
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from .checkpoint import (BEST, Checkpointer, agree_on_resume_tag, check_signature, load_weights, read_client_state,
                         read_latest_tag, resolve_tag, step_tag)
from .clipping import DeviceClipper, clips_on_device
from .config import RecipeConfig, deep_merge, to_yaml
from .distributed import DistContext, all_reduce_sums, barrier, deepspeed_args
from .errors import CheckpointError, ConfigError, UserError
from .analysis import GradientAnalysis, capture_batches, make_grad_fn, preserved_recipe_state
from .evaluation import evaluate_split
from .faults import FaultPlan, PreemptionSignals, StepGate, StepVerdict, agree_on_step, preemption, watchdog
from .monitor import Monitor
from .nt_asgd import build_averager
from .precision import apply_precision, deepspeed_precision, initialize as initialize_precise
from .recipe import BatchPlan, Recipe, even_shares
from .registry import RecipeSpec
from .rng import seed_everything
from .run_lock import RunLock
from .rundir import RunDir

log = logging.getLogger("trainer")


class TrainingError(UserError):
    pass


def plan_batch(global_batch: int, world: int, micro: int, rank: int = 0, uneven: bool = False) -> BatchPlan:
    """Split the global batch over ranks and accumulation steps (see ``BatchPlan``).

    ``micro`` (``train.micro_batch_size``, 0 = a rank's whole share) bounds a micro-batch; the accumulation
    count is what the largest share needs. A recipe that cannot train uneven shares gets exact division.
    """
    if global_batch < world:
        raise ConfigError(f"data.batch_size={global_batch} is smaller than the {world} data-parallel ranks; "
                          f"use a batch of at least {world} or fewer ranks")
    if global_batch % world and not uneven:
        raise ConfigError(
            f"data.batch_size={global_batch} does not divide over {world} data-parallel ranks; "
            f"use a multiple of {world}"
        )
    shares = even_shares(global_batch, world)
    largest = shares[0]
    micro = micro or largest
    if uneven:
        accumulation = -(-largest // micro)
        if shares[-1] < accumulation:
            raise ConfigError(
                f"train.micro_batch_size={micro} needs {accumulation} micro-batches per step, but a rank's share "
                f"of data.batch_size={global_batch} over {world} ranks is only {shares[-1]}; raise "
                "train.micro_batch_size or the batch")
        micro = -(-largest // accumulation)
    else:
        if largest % micro:
            raise ConfigError(
                f"train.micro_batch_size={micro} does not divide the per-rank batch {largest} "
                f"(data.batch_size={global_batch} over {world} ranks); pick a divisor of {largest}"
            )
        accumulation = largest // micro
    return BatchPlan(global_batch, world, rank, shares, micro, accumulation)


def resolve_precision(cfg: RecipeConfig, recipe_cls: type[Recipe], ctx: DistContext) -> str:
    """``auto``: the recipe's ``default_precision`` on a bf16-capable GPU, fp32 elsewhere (trainer/precision.py
    says what each mode is). bf16 also runs on CPU (slowly); a GPU without bf16 is refused in one line."""
    choice = cfg.train.precision
    bf16_ok = ctx.device.type == "cuda" and torch.cuda.is_bf16_supported()
    if choice == "auto":
        return recipe_cls.default_precision if bf16_ok else "fp32"
    if choice == "bf16" and ctx.device.type == "cuda" and not bf16_ok:
        raise ConfigError(f"train.precision=bf16: {torch.cuda.get_device_name(ctx.device)} has no bf16; "
                          "use train.precision=fp32 or auto")
    return choice


def deepspeed_config(cfg: RecipeConfig, plan: BatchPlan, precision: str) -> dict:
    """DeepSpeed's config for this run. Gradient clipping is the loop's wherever DeepSpeed's own would read back
    from the device (trainer/clipping.py): there ``gradient_clipping`` is 0. TensorBoard is the loop's own
    (trainer/monitor.py): DeepSpeed's monitor would add a second learning-rate series, flushed every step."""
    ds: dict[str, Any] = {
        # DeepSpeed's batch arithmetic (train = micro x accumulation x world) only describes even splits;
        # it only feeds its own logging, so an uneven plan gives it the largest micro-batch and no total.
        **({"train_batch_size": plan.global_batch} if plan.even else {}),
        "train_micro_batch_size_per_gpu": plan.micro,
        "gradient_accumulation_steps": plan.accumulation,
        "gradient_clipping": cfg.optim.clip,
        "steps_per_print": 10**12,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "zero_allow_untested_optimizer": True,
        # DeepSpeed's throughput timer synchronizes the device at every forward and step; the loop measures
        # perf/<unit>_per_s itself, so it and the per-phase wall-clock timers stay off
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
        "wall_clock_breakdown": False,
    }
    ds = deep_merge(deep_merge(ds, deepspeed_precision(precision, cfg.train.zero_stage)), cfg.train.deepspeed)
    if clips_on_device(precision, zero_stage_of(ds)):
        ds["gradient_clipping"] = 0.0
    return ds


def zero_stage_of(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


@dataclass
class LoopState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epochs completed
    steps_in_epoch: int = 0
    position: Any = None  # the recipe's data position within the current epoch
    best: float | None = None  # the best validation value of the recipe's best_metric so far
    last_eval_step: int = -1
    last_ckpt_step: int = -1
    skipped_steps: int = 0  # steps whose update was vetoed for a non-finite loss (train.on_nonfinite=skip)
    consecutive_skips: int = 0


class Trainer:
    def __init__(self, spec: RecipeSpec, cfg: RecipeConfig, ctx: DistContext, run_dir: RunDir, resume: bool):
        self.spec, self.cfg, self.ctx, self.run_dir = spec, cfg, ctx, run_dir
        self.faults = FaultPlan.from_env(ctx.rank)
        if self.faults:
            self.faults.raise_error(0)  # a rank failing at start-up
        if spec.requires_init and not resume and not cfg.train.init_from:
            raise ConfigError(f"recipe {spec.name} continues a trained run: pass --set train.init_from=RUN_DIR "
                              f"(its '{cfg.train.init_checkpoint}' checkpoint is loaded)")
        self.plan = plan_batch(cfg.data.batch_size, ctx.world, cfg.train.micro_batch_size, ctx.rank,
                               spec.factory.uneven_batches)
        self.precision = resolve_precision(cfg, spec.factory, ctx)
        apply_precision(self.precision)
        self.recipe: Recipe = spec.factory(cfg, ctx, self.plan)
        self.state = LoopState()

        self.recipe.setup()
        # one job per run directory, from before its first write (a resume's cleanup of an interrupted save)
        self.lock = RunLock.acquire(run_dir.path) if resume and ctx.is_main else None
        self._wrote = False  # the run's config (a new run), or its resumed state loaded (a resume)
        try:
            self._start(resume)
        except BaseException:
            if self.lock is not None and not self._wrote:
                self.lock.abandon()  # refused before anything was written: the directory is as it was
            raise

    def _start(self, resume: bool) -> None:
        cfg, ctx, run_dir, spec = self.cfg, self.ctx, self.run_dir, self.spec
        resume_tag = agree_on_resume_tag(run_dir.checkpoints, ctx) if resume else None
        if resume_tag:  # before anything is written: a refused resume leaves the run as it was
            self._check_compatible(read_client_state(run_dir.checkpoints, resume_tag), resume_tag)
        self.init_tag = init_tag = None
        if cfg.train.init_from and not resume_tag:  # likewise, a refused source creates no run directory
            self.init_tag = init_tag = self._check_init_source(cfg.train.init_from, cfg.train.init_checkpoint)
        seed_everything(cfg.seed)  # identical initial weights whatever the world size
        model = self.recipe.build_model()  # before the run directory: a refused model (model.name) leaves none
        if init_tag:
            load_weights(model, RunDir(cfg.train.init_from).checkpoints, init_tag)
            log.info("initialized weights from %s checkpoint %s", cfg.train.init_from, init_tag)
        if ctx.is_main and not resume:
            self.lock = RunLock.acquire(run_dir.path)  # creates the directory: nothing was refused so far
            self._write_config()
            self._wrote = True
        barrier(ctx)
        self.analysis = None
        if cfg.analysis.enabled:  # before DeepSpeed: the initial copy must be the fp32 initialization
            self.analysis = GradientAnalysis(cfg.analysis, model, ctx, seed=cfg.seed)
            self._analysis_batches = capture_batches(self.recipe, cfg.analysis.needed_batches)
        optimizer = self.recipe.build_optimizer(model)
        self.gate = StepGate(optimizer)  # DeepSpeed's wrappers and the scheduler's step tracking call through it
        self.scheduler = LambdaLR(optimizer, self.recipe.lr_factor)
        self.engine, _, _, _ = initialize_precise(
            model=model,
            optimizer=optimizer,
            lr_scheduler=self.scheduler,
            config=(ds := deepspeed_config(cfg, self.plan, self.precision)),
            args=deepspeed_args(ctx),
        )
        clips = clips_on_device(self.precision, zero_stage_of(ds))  # and DeepSpeed does not (deepspeed_config)
        self.clipper = DeviceClipper(self.engine, cfg.optim.clip) if clips else None
        if self.analysis is not None:
            self._analysis_grad = make_grad_fn(self.recipe, self.engine, ctx.device)
        seed_everything(cfg.seed + 1000003 * ctx.rank)  # per-rank streams (timm's dropout, mixup; AWD-LSTM keys its own)
        self.monitor = Monitor(run_dir, ctx, tensorboard=True)
        self.ckpt = Checkpointer(self.engine, run_dir.checkpoints, ctx, cfg.train.keep_last)
        self.averager = build_averager(cfg.optim, self.engine.module, ctx)
        self._stop_requested = False
        self.preempted: str | None = None
        if resume_tag:
            self._resume(resume_tag)
            self._wrote = True
            if ctx.is_main:  # only once the resumed state has loaded: a failed resume leaves the run as it was
                self._write_config()
        self.preemption = PreemptionSignals()
        if watchdog.active() is not None:
            watchdog.active().hint = f"; --resume --run-dir {run_dir.path} continues from its last checkpoint"

    def _write_config(self) -> None:
        self.run_dir.config.write_text(to_yaml(self.cfg))

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
        self.ckpt.save(tag, trainer_state, self.recipe, self.averager)
        log.info("saved checkpoint %s at step %d", tag, self.state.step)

    def _resume(self, tag: str) -> None:
        """Continue from ``tag``: the checkpointer restores the engine, recipe, average and RNG streams (on this
        world size or another) and hands back the loop's saved state."""
        for k, v in self.ckpt.restore(tag, self.recipe, self.averager, self.plan.global_batch).items():
            if hasattr(self.state, k):
                setattr(self.state, k, v)
        log.info("resumed from %s at step %d (epoch %d)", tag, self.state.step, self.state.epoch)

    # ----------------------------------------------------------------- evaluation
    def evaluate(self, split: str) -> dict[str, float]:
        return evaluate_split(self.recipe, self.engine.module, split, self.ctx)

    def _averaged(self):
        """Evaluate and keep 'best' with the averaged weights once averaging runs."""
        return self.averager.swapped() if self.averager is not None else nullcontext()

    def _validate(self, observe: bool = True) -> None:
        """Validate, keep 'best' and (``observe``) let the averager's non-monotone rule see the score."""
        s = self.state
        s.last_eval_step = s.step
        with self._averaged():
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
        extra = {}
        if self.averager is not None and observe:
            event = self.averager.observe(metrics["loss"], s.step)
            if event == "start":
                extra["asgd_start_step"] = self.averager.start_step
                log.info("validation stopped improving: averaging (NT-ASGD) from step %d", self.averager.start_step)
            elif event == "stop":
                extra["stop"] = "nonmono"
                self._stop_requested = True
                log.info("validation stopped improving while averaging: stopping (optim.stop_on_nonmono)")
        self.monitor.record("valid", s.step, self._epoch_progress(), metrics, extra)
        self.monitor.console(f"step {s.step} valid", metrics)

    def _analyse(self) -> None:
        with preserved_recipe_state(self.recipe):
            scalars = self.analysis.run(self.state.step, self._analysis_grad, self._analysis_batches)
        self.monitor.scalars(self.state.step, scalars)
        self.monitor.console(f"step {self.state.step} analysis", scalars)

    def _test_best(self) -> None:
        if not (self.run_dir.checkpoints / BEST).is_dir():
            return
        self.ckpt.load(BEST, module_only=True)
        metrics = self.evaluate("test")
        self.monitor.record("test", self.state.step, self._epoch_progress(), metrics, {"checkpoint": BEST})
        self.monitor.console("test (best checkpoint)", metrics)

    # ----------------------------------------------------------------- training
    def _epoch_progress(self) -> float:
        per = self.recipe.steps_per_epoch()
        return self.state.epoch + (self.state.steps_in_epoch / per if per else 0.0)

    def _set_lr(self, scale: float) -> tuple[float, float]:
        """Set the step's learning rate: the schedule's, times the step's own scale (e.g. AWD-LSTM's BPTT rescale).
        Returns (scheduled, applied) as ``optim.lr`` sees them."""
        factor = self.recipe.lr_factor(self.state.step)
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
        averaging = self.averager.scalars() if self.averager is not None else {}
        extra = {**rate, **{k.replace("/", "_"): v for k, v in averaging.items()}}
        if s.skipped_steps:
            extra["skipped_steps"] = s.skipped_steps
        if self.averager is not None and self.averager.start_step is not None:
            extra["asgd_start_step"] = self.averager.start_step
        extra["lr_applied"] = lr[1]
        self.monitor.record("train", s.step, self._epoch_progress(), {**metrics, "lr": lr[0]}, extra)
        self.monitor.scalars(s.step, {**{f"perf/{k}": v for k, v in rate.items()}, **averaging})
        self.monitor.console(f"step {s.step} epoch {self._epoch_progress():.2f}", {**metrics, "lr": lr[0], **rate})
        if self._bar is not None:
            self._bar.set_postfix({k: _short(v) for k, v in {**metrics, **rate}.items()})

    def _step(self, ts, window: dict) -> tuple[tuple[float, float], StepVerdict]:
        """One optimizer step over the step's micro-batches; returns its (scheduled, applied) learning rate and what
        the ranks agreed on before the update (a non-finite loss anywhere vetoes it, a signal anywhere preempts)."""
        recipe, engine, s = self.recipe, self.engine, self.state
        lr = self._set_lr(ts.lr_scale)
        self.monitor.scalars(s.step + 1, recipe.before_step(engine, s.step, self._epoch_progress()))
        if self.faults:
            self.faults.signal_self(s.step + 1)
            self.faults.raise_error(s.step + 1)
        finite = torch.ones((), dtype=torch.bool, device=self.ctx.device)
        step_metrics: dict = {}  # per-micro means, weighted by their sizes
        step_weight = 0.0
        last = len(ts.micro_batches) - 1
        for k, micro in enumerate(ts.micro_batches):
            out = recipe.micro_loss(engine, micro)
            loss = self.plan.weighted_loss(out)
            loss = self.faults.corrupt_loss(loss, s.step + 1) if self.faults else loss
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
        s.position = ts.position
        if verdict.vetoed:
            self._skip_nonfinite(verdict)
        else:
            s.consecutive_skips = 0
            for name, v in step_metrics.items():
                window[name] = window.get(name, 0.0) + v
            window["_weight"] += step_weight
            if self.averager is not None:
                self.averager.after_step(s.step)
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
            for ts in self.recipe.train_steps(s.epoch, s.position):
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
                if self.analysis is not None and self.analysis.due(s.step):
                    self._analyse()
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
                s.position = None
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

            self._bar = tqdm(total=self.recipe.steps_per_epoch(), initial=self.state.steps_in_epoch,
                             desc=f"epoch {self.state.epoch + 1}", unit="step", dynamic_ncols=True, leave=False)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _short(v: float) -> str:
    return f"{v:.4g}"
