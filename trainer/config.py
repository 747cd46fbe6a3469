"""Typed, validated recipe configs: YAML defaults, user YAML, then ``--set`` overrides.

Every recipe config derives from :class:`RecipeConfig`; sections forbid unknown keys so a typo
is an error that names the key instead of a silently ignored setting.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError

DATA_ENV = "DSRECIPES_DATA"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrainConfig(Section):
    epochs: int = Field(1, ge=1)
    max_steps: int = Field(0, ge=0, description="stop after this many optimizer steps; 0 = no limit")
    eval_every: int = Field(0, ge=0, description="optimizer steps between evaluations; 0 = once per epoch")
    checkpoint_every: int = Field(0, ge=0, description="optimizer steps between checkpoints; 0 = once per epoch")
    keep_last: int = Field(3, ge=1, description="step checkpoints kept besides 'best'")
    log_every: int = Field(50, ge=1)
    micro_batch_size: int = Field(0, ge=0, description="per-rank micro-batch; 0 = the whole per-rank batch")
    precision: Literal["auto", "fp32", "tf32", "bf16"] = Field(
        "auto", description="fp32 (IEEE, TF32 off), tf32, bf16 (DeepSpeed bf16, fp32 masters); auto: the recipe's "
        "default on a bf16-capable GPU, else fp32 (trainer/precision.py)")
    zero_stage: int = Field(0, ge=0, le=2)
    test_at_end: bool = Field(True, description="evaluate the best checkpoint on the test split at the end")
    progress: bool = True
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="merged last into the DeepSpeed config")
    init_from: str | None = Field(None, description="start from the weights of this run directory's checkpoint")
    init_checkpoint: str = Field("best", description="which checkpoint of init_from: best, latest or a tag")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a nan/inf loss on any rank: stop (the last good checkpoint is kept) or skip the step")
    max_consecutive_skips: int = Field(20, ge=1, description="on_nonfinite=skip: stop after this many in a row")
    lost_rank_timeout_s: float = Field(
        60.0, ge=1, description="end the job when a rank has not answered for this long (same node: ~2 s)")


class DataConfig(Section):
    root: str | None = Field(None, description=f"dataset directory; default ${DATA_ENV} or data/")
    batch_size: int = Field(..., ge=1, description="the global batch, split evenly over data-parallel ranks")

    @field_validator("root", mode="after")
    @classmethod
    def _default_root(cls, value: str | None) -> str:
        return value if value else os.environ.get(DATA_ENV, "data")


class OptimConfig(Section):
    lr: float = Field(..., gt=0)
    clip: float = Field(0.0, ge=0, description="global gradient-norm clip; 0 = off")
    averaging: Literal["none", "nt_asgd"] = Field("none", description="iterate averaging (NT-ASGD)")
    nonmono: int = Field(5, ge=1, description="NT-ASGD: evaluations excluded from the best it compares against")
    t0: int = Field(0, ge=0, description="NT-ASGD: average from this optimizer step whatever the trigger; 0 = trigger")
    stop_on_nonmono: bool = Field(False, description="stop when the trigger fires while averaging (fine-tuning)")


class AnalysisConfig(Section):
    """The opt-in gradient analysis of "Dropout Reduces Underfitting" (trainer/analysis.py), logged under analysis/."""

    enabled: bool = False
    every: int = Field(1000, ge=1, description="optimizer steps between analyses")
    batches: int = Field(8, ge=2, description="K: train-mode mini-batch gradients compared with each other")
    reference_batches: int = Field(16, ge=1, description="S: mini-batches of the eval-mode ground-truth gradient")
    init_on_cpu: bool = Field(True, description="keep the fp32 copy of the initial parameters in host memory")

    @property
    def needed_batches(self) -> int:
        """The K train-mode batches are the first K of the S reference ones when S >= K, so max(K, S)."""
        return max(self.batches, self.reference_batches)



class RecipeConfig(Section):
    recipe: str = ""
    seed: int = 0
    train: TrainConfig
    data: DataConfig
    optim: OptimConfig
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)


def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{key}'")
        elif e["type"] == "missing":
            parts.append(f"'{key}' is required")
        elif e["type"] == "value_error":  # a validator's own message already names the keys
            msg = e["msg"].removeprefix("Value error, ")
            if key and re.match(r"^\w+: ", msg):  # "schedule: ..." from the section's validator
                msg = f"{key}.{msg}"
            elif key and not msg.startswith(key):
                msg = f"{key}: {msg}"
            parts.append(msg)
        else:
            parts.append(f"{key}: {e['msg'].lower()} (got {e.get('input')!r})")
    return "; ".join(parts)


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_known_keys(ann, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _unknown_key_hint(model: type[BaseModel], key: str) -> str:
    close = difflib.get_close_matches(key, _known_keys(model), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    """``a.b=value`` strings to (key, value); values are parsed as YAML scalars (``1.5``, ``true``, ``[1, 2]``)."""
    out = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got '{pair}'")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
    return out


def apply_override(tree: dict, key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path}{where} is not valid YAML; fix its syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    return data


def read_config_file(path: str | Path) -> dict:
    """A YAML config, with ``_base_: other.yaml`` (relative to it) merged underneath."""
    path = Path(path)
    data = read_yaml(path)
    base = data.pop("_base_", None)
    if base is None:
        return data
    return deep_merge(read_config_file(path.parent / base), data)


def build_config(model: type[RecipeConfig], layers: list[dict], overrides: list[str]) -> RecipeConfig:
    """Merge config layers in order, apply ``--set`` overrides, validate; errors are one line naming the key."""
    tree: dict = {}
    for layer in layers:
        tree = deep_merge(tree, layer)
    for key, value in parse_overrides(overrides):
        apply_override(tree, key, value)
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        msg = _format_validation_error(err)
        first = err.errors()[0]
        if first["type"] == "extra_forbidden":
            hint = _unknown_key_hint(model, ".".join(str(p) for p in first["loc"]))
            msg += hint or "; --print-config lists every key of the recipe"
        else:
            msg += "; correct it where it is set (--set, a --config file or the sweep file)"
        raise ConfigError(f"config error: {msg}") from None


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
