"""Typed, validated recipe configs: YAML defaults, user YAML, then ``--set`` overrides.

Every recipe config derives from :class:`RecipeConfig`; sections forbid unknown keys so a typo
is an error that names the key instead of a silently ignored setting.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import os
import re
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError

DATA_ENV = "DSRECIPES_DATA"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# DeepSpeed keys the project sets from its own config: train.deepspeed (the escape hatch, merged last) must not undo
# what the checks on these keys allow
DEEPSPEED_OWN_KEYS = {
    "train_batch_size": "data.batch_size", "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.micro_batch_size", "gradient_clipping": "optim.clip",
    "zero_optimization.stage": "train.zero_stage", "bf16": "train.precision", "fp16": "train.precision",
    "amp": "train.precision", "torch_autocast": "train.precision", "optimizer": "the recipe's optim.* keys",
    "scheduler": "the recipe's optim.* keys", "tensorboard": "the run's own TensorBoard (tensorboard/)",
}


def _check_deepspeed_section(extra: dict[str, Any]) -> dict[str, Any]:
    for path, owner in DEEPSPEED_OWN_KEYS.items():
        node: Any = extra
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            raise ValueError(f"train.deepspeed.{path} is set by {owner}: set that instead (train.deepspeed is for "
                             "DeepSpeed keys the project does not set)")
    zero = extra.get("zero_optimization")
    if zero is not None:
        if not isinstance(zero, dict):
            raise ValueError(f"train.deepspeed.zero_optimization must be a mapping, not {zero!r}")
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig  # only when the section is given
        from pydantic import ValidationError as DeepSpeedValidationError

        try:
            DeepSpeedZeroConfig(**zero)
        except (DeepSpeedValidationError, TypeError, ValueError) as e:
            first = str(e).splitlines()
            raise ValueError(f"train.deepspeed.zero_optimization is refused by DeepSpeed: "
                             f"{' '.join(line.strip() for line in first[1:3]) or first[0]}") from None
    return extra


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

    @field_validator("deepspeed", mode="after")
    @classmethod
    def _deepspeed_extra(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_deepspeed_section(value)


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

    # What a --resume may change (dotted keys; "section.*" for a whole section): how long to train and how often to
    # evaluate, save, log and analyse, where the data is, how the ranks share the work (the run is the same on any
    # world size, micro-batch and ZeRO stage), what bounds a failure. Everything else (model, data order and batch,
    # optimizer, schedules, precision, seed) is what the checkpoint was trained with; a recipe adds its own.
    resume_may_change: ClassVar[tuple[str, ...]] = (
        "train.epochs", "train.max_steps", "train.eval_every", "train.checkpoint_every", "train.keep_last",
        "train.log_every", "train.progress", "train.test_at_end", "train.micro_batch_size", "train.zero_stage",
        "train.on_nonfinite", "train.max_consecutive_skips", "train.lost_rank_timeout_s",
        "data.root", "data.verify", "data.download", "analysis.*")

    @field_validator("seed", mode="after")
    @classmethod
    def _seed(cls, value: int) -> int:
        """numpy's generators take seeds from 0, torch's below 2**64: one range for every stream the run seeds."""
        if not 0 <= value < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {value}")
        return value

    def check_resume(self, saved: "RecipeConfig", run_dir: str) -> None:
        """Refuse, in one line and before anything is written, a resume that changes what its checkpoint was
        trained with (see ``resume_may_change``)."""
        refused = [d for d in config_diff(saved.model_dump(mode="json"), self.model_dump(mode="json"))
                   if not any(fnmatch.fnmatchcase(d[0], pattern) for pattern in self.resume_may_change)]
        if refused:
            raise ConfigError(
                f"--resume cannot change {diffs_text(refused)}: the checkpoints in {run_dir} were trained with the "
                f"old value{'s' if len(refused) > 1 else ''}; drop the change, or start a new run from this one with "
                f"--set train.init_from={run_dir} (a resume may change: {', '.join(self.resume_may_change)})")


UNSET = object()  # a key one of two configs does not have


def config_diff(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every key whose value differs, by key; UNSET where one side lacks it.
    ``True == 1``, yet a bool is not an int: types count too."""
    a, b = flatten(old), flatten(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, UNSET), b.get(key, UNSET)
        if x != y or type(x) is not type(y):
            diffs.append((key, x, y))
    return diffs


def diffs_text(diffs: list[tuple[str, Any, Any]], show: Callable[[Any], str] = repr, limit: int = 3) -> str:
    """``key old -> new`` for the first ``limit`` of :func:`config_diff`'s keys, then how many more."""
    fmt = lambda v: "(unset)" if v is UNSET else show(v)  # noqa: E731
    shown = ", ".join(f"{k} {fmt(old)} -> {fmt(new)}" for k, old, new in diffs[:limit])
    more = len(diffs) - limit
    return shown + (f" and {more} more" if more > 0 else "")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config as {dotted key: value} (an empty mapping is a value of its own)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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
    """Set ``key`` (a dotted path) in ``tree``. A mapping given for a section is merged into it key by key, as a
    config file's is (``--set 'drop={cutoff_epoch: 40}'`` changes that key, not the section's others)."""
    node = tree
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        value = deep_merge(node[last], value)
    node[last] = value


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
