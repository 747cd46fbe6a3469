"""DeepSpeed's engine for a run: its precision, its config (what the project owns set from the recipe's config),
and the loop's own gradient clipping where DeepSpeed's would read back from the device."""

from __future__ import annotations

from typing import Any

import torch

from .batching import BatchPlan
from .clipping import DeviceClipper, clips_on_device
from .config import RecipeConfig, deep_merge
from .distributed import DistContext, deepspeed_args
from .errors import ConfigError
from .precision import apply_precision, deepspeed_precision, initialize as initialize_precise


def resolve_precision(cfg: RecipeConfig, recipe_cls: type, ctx: DistContext) -> str:
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


def choose_precision(cfg: RecipeConfig, recipe_cls: type, ctx: DistContext) -> str:
    """The run's precision (:func:`resolve_precision`), set on this process's matmul and cuDNN flags."""
    precision = resolve_precision(cfg, recipe_cls, ctx)
    apply_precision(precision)
    return precision


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


def build_engine(model, optimizer, scheduler, cfg: RecipeConfig, plan: BatchPlan, precision: str, ctx: DistContext):
    """``deepspeed.initialize`` for the run; returns the engine and the loop's clipper (None where DeepSpeed
    clips, or nothing does)."""
    engine, _, _, _ = initialize_precise(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                         config=(ds := deepspeed_config(cfg, plan, precision)),
                                         args=deepspeed_args(ctx))
    clips = clips_on_device(precision, zero_stage_of(ds))  # and DeepSpeed does not (deepspeed_config)
    return engine, (DeviceClipper(engine, cfg.optim.clip) if clips else None)
