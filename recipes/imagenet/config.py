"""The ImageNet recipes' config: the "Dropout Reduces Underfitting" basic recipe, typed and bounded."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from trainer.config import DataConfig, OptimConfig, RecipeConfig, Section, TrainConfig
from trainer.nt_asgd.config import NTASGDKeys
from trainer.schedules import DropSchedule, Mode, Shape, check_cutoff


_WHAT = {"dropout": "dropout", "drop_path": "stochastic depth"}


class DropConfig(Section):
    """Dropout and stochastic-depth rates with their early/late schedules.

    The shared ``mode``/``schedule``/``cutoff_epoch`` apply to both kinds unless a per-kind
    override is set, since the paper pairs e.g. early dropout with standard stochastic depth.
    """

    dropout: float = Field(0.0, ge=0, lt=1, description="dropout rate (all nn.Dropout layers, attention included)")
    drop_path: float = Field(0.0, ge=0, lt=1, description="stochastic-depth rate of the last block; "
                             "earlier blocks get linearly less, the first none")
    mode: Mode = Field("standard", description="standard: rate throughout; early: only before cutoff_epoch; "
                       "late: only from cutoff_epoch")
    schedule: Shape = Field("constant", description="early phase shape: constant, or linear decay to 0 at the "
                            "cutoff; late allows constant only; ignored by standard")
    cutoff_epoch: int = Field(0, ge=0, description="epoch where early dropout ends / late dropout starts; "
                              "1 .. train.epochs-1 for early and late")
    dropout_mode: Mode | None = Field(None, description="dropout's mode; None = mode")
    drop_path_mode: Mode | None = Field(None, description="stochastic depth's mode; None = mode")
    dropout_schedule: Shape | None = Field(None, description="dropout's schedule; None = schedule")
    drop_path_schedule: Shape | None = Field(None, description="stochastic depth's schedule; None = schedule")
    dropout_cutoff_epoch: int | None = Field(None, ge=0, description="dropout's cutoff epoch; None = cutoff_epoch")
    drop_path_cutoff_epoch: int | None = Field(None, ge=0,
                                               description="stochastic depth's cutoff epoch; None = cutoff_epoch")

    def _resolve(self, kind: str) -> tuple[tuple[str, Mode], tuple[str, Shape], tuple[str, int]]:
        """Effective (key, value) per setting, so errors can name the key the user actually set."""
        out = []
        for shared in ("mode", "schedule", "cutoff_epoch"):
            key = f"{kind}_{shared}"
            value = getattr(self, key)
            out.append((key, value) if value is not None else (shared, getattr(self, shared)))
        return tuple(out)  # type: ignore[return-value]

    @model_validator(mode="after")
    def _check_schedules(self) -> DropConfig:
        for kind in ("dropout", "drop_path"):
            (mode_key, mode), (shape_key, shape), (cut_key, cut) = self._resolve(kind)
            if mode == "late" and shape == "linear":
                raise ValueError(f"{shape_key}: late allows constant only ({mode_key} is 'late', got 'linear')")
            if mode != "standard" and cut == 0:
                raise ValueError(f"{cut_key}: {mode_key} '{mode}' needs a cutoff epoch >= 1")
        return self

    def check_epochs(self, epochs: int) -> None:
        """Raise ValueError naming both keys if an early or late cutoff is not before ``train.epochs``.

        A recipe config calls it from its own validator, where ``train.epochs`` is known. A kind whose rate is 0
        is not checked: its schedule is 0 whatever the cutoff (e.g. a dropout baseline of an early-dropout recipe).
        """
        for kind in ("dropout", "drop_path"):
            (_, mode), _, (cut_key, cut) = self._resolve(kind)
            if getattr(self, kind) > 0:
                check_cutoff(cut_key, mode, cut, epochs, _WHAT[kind])

    def _schedule_for(self, kind: str, epochs: int, steps_per_epoch: int) -> DropSchedule:
        (_, mode), (_, shape), (_, cut) = self._resolve(kind)
        return DropSchedule(base=getattr(self, kind), mode=mode, shape=shape, cutoff_epoch=cut,
                            epochs=epochs, steps_per_epoch=steps_per_epoch)

    def dropout_schedule_for(self, epochs: int, steps_per_epoch: int) -> DropSchedule:
        return self._schedule_for("dropout", epochs, steps_per_epoch)

    def drop_path_schedule_for(self, epochs: int, steps_per_epoch: int) -> DropSchedule:
        return self._schedule_for("drop_path", epochs, steps_per_epoch)


class ImageModelConfig(Section):
    name: str = Field("vit_tiny_patch16_224", description="any timm model name")
    num_classes: int = Field(0, ge=0, description="0 = the number of classes found in the data")
    pretrained: bool = False
    channels_last: bool = Field(True, description="channels-last memory format on GPU")
    kwargs: dict = Field(default_factory=dict, description="extra keyword arguments for timm.create_model")


class ImageDataConfig(DataConfig):
    batch_size: int = Field(4096, ge=1)
    format: Literal["folder", "wds", "synthetic"] = Field(
        "folder", description="ImageFolder layout, WebDataset tar shards, or random tensors (to benchmark)")
    train_shards: str | None = Field(None, description="wds: brace pattern of training shards, relative to root")
    val_shards: str | None = Field(None, description="wds: brace pattern of validation shards, relative to root")
    train_size: int = Field(0, ge=0, description="wds, synthetic: training images (sets the epoch length)")
    image_size: int = Field(224, ge=8, description="input size; the model is built for it")
    eval_batch_size: int = Field(0, ge=0, description="global; 0 = 1.5x the training batch")
    workers: int = Field(-1, ge=-1, description="loader processes per rank; -1 = the CPUs this rank may use "
                         "(affinity mask or SLURM_CPUS_PER_TASK, over the ranks sharing them) but one, at least 1")
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = Field(0.4, ge=0.0)
    reprob: float = Field(0.25, ge=0.0, le=1.0, description="random erasing probability")
    interpolation: Literal["bicubic", "bilinear", "random"] = "bicubic"
    crop_pct: float = Field(0.875, gt=0.0, le=1.0)
    mixup: float = Field(0.8, ge=0.0, description="mixup alpha; 0 = off")
    cutmix: float = Field(1.0, ge=0.0, description="cutmix alpha; 0 = off")
    mixup_prob: float = Field(1.0, ge=0.0, le=1.0)
    mixup_switch_prob: float = Field(0.5, ge=0.0, le=1.0)
    smoothing: float = Field(0.1, ge=0.0, lt=1.0, description="label smoothing")

    @field_validator("auto_augment", mode="after")
    @classmethod
    def _timm_policy(cls, value: str | None) -> str | None:
        """timm parses the policy when the loader is built, on every rank: parse it here, before any rank starts."""
        if value:
            from trainer.errors import DataError

            from .data.transforms import build_transforms

            try:
                build_transforms(32, True, auto_augment=value)
            except DataError:
                raise ValueError(f"timm has no augmentation policy {value!r}: use its spelling, e.g. "
                                 "'rand-m9-mstd0.5-inc1' (RandAugment), 'augmix-m5', 'v0', or null for none") from None
        return value


class ImageOptimConfig(OptimConfig, NTASGDKeys):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(4e-3, gt=0)
    lr_batch: int = Field(4096, ge=1, description="optim.lr is for this global batch; scaled linearly with it")
    min_lr: float = Field(1e-6, ge=0)
    warmup_epochs: float = Field(50, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)

    @field_validator("betas", mode="after")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"each of AdamW's betas must be in [0, 1), got {list(value)}")
        return value
    eps: float = Field(1e-8, gt=0)
    momentum: float = Field(0.9, ge=0)
    clip: float = Field(0.0, ge=0, description="global gradient-norm clip; 0 = off (the paper)")


class ImageTrainConfig(TrainConfig):
    epochs: int = Field(300, ge=1)
    log_every: int = 100
    compile: bool = Field(False, description="torch.compile the model; modules whose rate a linear schedule changes "
                          "every step stay eager (recipes/imagenet/compile.py)")


class ImageNetConfig(RecipeConfig):
    # loader processes and the evaluation batch change no result; compiling changes kernels, not the training
    resume_may_change = (*RecipeConfig.resume_may_change, "data.workers", "data.eval_batch_size", "train.compile")

    seed: int = 0
    train: ImageTrainConfig
    data: ImageDataConfig
    model: ImageModelConfig
    optim: ImageOptimConfig
    drop: DropConfig = Field(default_factory=DropConfig)

    @model_validator(mode="after")
    def _check(self) -> "ImageNetConfig":
        if self.data.format == "wds" and not (self.data.train_shards and self.data.val_shards and self.data.train_size):
            raise ValueError("data.format wds needs data.train_shards, data.val_shards and data.train_size")
        if self.data.format == "synthetic" and not (self.data.train_size and self.model.num_classes):
            raise ValueError("data.format synthetic needs data.train_size and model.num_classes")
        if self.optim.min_lr > self.optim.lr:
            raise ValueError(f"optim.min_lr {self.optim.min_lr} is above optim.lr {self.optim.lr}")
        self.drop.check_epochs(self.train.epochs)  # before any rank starts: a cutoff the run never reaches
        return self
