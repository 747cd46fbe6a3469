"""ImageNet classification with timm models and early / late dropout and stochastic depth (Liu et al. 2023).

The drop rates follow per-step schedules (``trainer/schedules``, over the training stream's epochs) set on the live
model before every optimizer step (``drop_sites`` finds where), at the reference's sites (no classifier-head dropout); the models are built with every drop-path
slot present so that blocks created at rate 0 still take later rates. Training uses timm's transforms, mixup /
cutmix and losses; loader workers send uint8 images, normalized (then, for training, randomly erased and mixed)
on the device. Evaluation sums loss and top-1 / top-5 hits over each rank's disjoint share of the validation
images, so the reduced numbers are exact at any world size.
"""

from __future__ import annotations

import difflib
import logging
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from trainer.distributed import all_reduce_sums
from trainer.errors import ConfigError, DataError
from trainer.recipe import BatchPlan, MicroResult, Recipe, StepContext, TrainData, TrainStep

from .compile import compile_model
from .config import DropConfig, ImageDataConfig, ImageNetConfig
from .drop_sites import DropSites, prepare_drop_path
from .data.loading import eval_loader, train_loader
from .data.splits import open_split
from .data.synthetic import SyntheticSplit
from .data.transforms import DeviceNormalize, build_erasing, build_transforms

log = logging.getLogger(__name__)


@dataclass
class ImageMicroBatch:
    images: torch.Tensor  # normalized (and, for training, randomly erased) on the device
    labels: torch.Tensor


class ImageStream(TrainData):
    """This rank's share of each step's images, in the epoch's seeded order; uint8 from the loader's workers,
    normalized and randomly erased on the device (mixup follows in the loss)."""

    def __init__(self, plan: BatchPlan, loader, normalize: DeviceNormalize, erasing, channels_last: bool,
                 device: torch.device, sharded: bool, drop: DropConfig, epochs: int):
        super().__init__(plan)
        self.loader, self.normalize, self.erasing, self.sharded = loader, normalize, erasing, sharded
        self.channels_last, self.device = channels_last and device.type == "cuda", device
        self.position: int | None = None  # steps of the epoch taken; None: its start
        steps = self.steps_per_epoch()  # the schedules count optimizer steps over this stream's epochs
        self.dropout_schedule = drop.dropout_schedule_for(epochs, steps)
        self.drop_path_schedule = drop.drop_path_schedule_for(epochs, steps)

    def steps_per_epoch(self) -> int:
        return self.loader.steps_per_epoch

    def steps(self, epoch: int) -> Iterator[TrainStep]:
        start = self.position or 0
        self.loader.set_epoch(epoch, start)
        plan, dev = self.plan, self.device
        for i, (images, labels, _) in enumerate(self.loader, start + 1):
            images = self.normalize(images.to(dev, non_blocking=True))
            if self.erasing is not None:  # on normalized values, as timm's; mixup follows in the loss
                images = self.erasing(images)
            labels = labels.to(dev, non_blocking=True)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            n = images.size(0)
            if n < plan.per_rank:  # unreadable images were skipped: spread what is left over the micro-batches
                log.debug("batch %d has %d of %d images", i, n, plan.per_rank)
            bounds = [round(k * n / plan.accumulation) for k in range(plan.accumulation + 1)]
            micro = [ImageMicroBatch(images[a:b], labels[a:b]) for a, b in zip(bounds, bounds[1:])]
            self.position = i
            yield TrainStep(micro, units=n, position=i)
        self.position = None

    def report(self) -> dict[str, float]:
        """The unreadable training images so far (summed over ranks with each validation)."""
        return {"skipped_train_images": float(self.loader.skipped)}

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state.get("position")

    def rank_state_dict(self) -> dict:
        """This rank's unreadable training images so far, so the logged total goes on across a resume."""
        return {"skipped_train_images": self.loader.skipped}

    def load_rank_state_dict(self, state: dict) -> None:
        self.loader.skipped = state.get("skipped_train_images", 0)

    def load_rank_states(self, states: list[dict]) -> None:
        """Rank 0 carries the old ranks' skipped-image total (only the sum is logged). A folder position means
        the same images on any world size (every step reads the same slice of the epoch's permutation);
        WebDataset shards are dealt to the ranks instead."""
        total = sum(s.get("skipped_train_images", 0) for s in states)
        self.load_rank_state_dict({"skipped_train_images": total if self.plan.rank == 0 else 0})
        if self.sharded:
            log.warning("data.format wds: shards are dealt to ranks, so on %d ranks instead of %d the rest of "
                        "this epoch reads another share of its samples (some may repeat or be missed until the "
                        "epoch ends)", self.plan.world, len(states))


class ImageNetRecipe(Recipe):
    config_model = ImageNetConfig
    unit = "samples"
    best_metric = "top1"
    best_mode = "max"
    report_split = "valid"  # ImageNet's labelled test set is not public: validation is what papers report
    default_precision = "fp32"  # the reference (facebookresearch/dropout) trains in fp32 without AMP

    cfg: ImageNetConfig

    # ------------------------------------------------------------------ data
    def setup(self) -> None:
        d = self.cfg.data
        self.normalize = DeviceNormalize(self.ctx.device)
        self.val_set = self._open("val")
        found = len(getattr(self.val_set, "classes", None) or ())  # shards name no classes: None
        self.num_classes = self.cfg.model.num_classes or found
        if not self.num_classes:
            raise ConfigError("model.num_classes is 0 and the data does not name its classes; set model.num_classes")
        if found > self.num_classes:  # a label past the classifier's outputs would fail the first step's loss
            raise ConfigError(f"model.num_classes={self.num_classes} but {d.root} has {found} classes; set "
                              f"model.num_classes={found}, or 0 to take the data's count")
        eval_global = d.eval_batch_size or max(1, int(1.5 * d.batch_size))
        self.val_loader = eval_loader(self.val_set, self.ctx, max(1, eval_global // self.ctx.world),
                                      workers=self._workers())
        self.mixup = build_mixup(self.cfg.data, self.num_classes)
        self.criterion = self._build_criterion()
        self._sites: DropSites | None = None  # the live model's dropout and drop-path modules, found once
        self._applied: tuple[float, float] | None = None  # the scheduled rates last set on the model
        self._carried: dict[str, float] = {}  # and what the model reported carrying then

    def train_data(self, plan: BatchPlan) -> ImageStream:
        d = self.cfg.data
        loader = train_loader(self._open("train"), self.ctx, plan.per_rank, workers=self._workers(), seed=self.cfg.seed)
        return ImageStream(plan, loader, self.normalize, build_erasing(d.reprob, self.ctx.device),
                           self.cfg.model.channels_last, self.ctx.device, sharded=d.format == "wds", drop=self.cfg.drop,
                           epochs=self.cfg.train.epochs)

    def _workers(self) -> int | None:
        """``data.workers``; None (-1): the loaders choose from the CPUs this rank may use."""
        return None if self.cfg.data.workers < 0 else self.cfg.data.workers

    def _open(self, split: str):
        d = self.cfg.data
        if d.format == "synthetic":
            size = d.train_size if split == "train" else max(1, d.train_size // 25)
            return SyntheticSplit(size, d.image_size, self.cfg.model.num_classes)
        if split == "train":
            tf = build_transforms(d.image_size, True, auto_augment=d.auto_augment, interpolation=d.interpolation,
                                  color_jitter=d.color_jitter)
            return open_split(d.root, split, tf, format=d.format, shards=d.train_shards, samples=d.train_size or None)
        tf = build_transforms(d.image_size, False, interpolation=d.interpolation, crop_pct=d.crop_pct)
        return open_split(d.root, split, tf, format=d.format, shards=d.val_shards)

    def _build_criterion(self) -> nn.Module:
        """For batches without mixup (mixup off, or a batch of one): hard labels, smoothed as configured."""
        from timm.loss import LabelSmoothingCrossEntropy

        s = self.cfg.data.smoothing
        return LabelSmoothingCrossEntropy(s) if s > 0 else nn.CrossEntropyLoss()

    # ------------------------------------------------------------------ model and optimizer
    def build_model(self) -> nn.Module:
        import timm

        m, size = self.cfg.model, self.cfg.data.image_size
        if not timm.is_model(m.name):
            close = difflib.get_close_matches(m.name, timm.list_models(), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else "; see timm.list_models()"
            raise ConfigError(f"model.name: timm has no model '{m.name}'{hint}")
        kwargs = dict(pretrained=m.pretrained, num_classes=self.num_classes, drop_rate=0.0, drop_path_rate=0.0,
                      **m.kwargs)
        try:
            model = timm.create_model(m.name, img_size=size, **kwargs)
        except TypeError as err:  # convolutional models take any input size and have no img_size argument
            if "img_size" not in str(err):
                raise ConfigError(f"model.kwargs: timm could not build {m.name}: {err}") from None
            model = timm.create_model(m.name, **kwargs)
        blocks = prepare_drop_path(model)
        log.info("%s: %.1fM parameters, %d blocks with stochastic depth, %d px input", m.name,
                 sum(p.numel() for p in model.parameters()) / 1e6, blocks, size)
        if m.channels_last and self.ctx.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        return model

    def for_training(self, model: nn.Module, data: ImageStream) -> nn.Module:
        """``train.compile``: compiled around the modules the schedules change (launch/evaluate.py runs eagerly)."""
        log.info("dropout: %s; stochastic depth: %s", data.dropout_schedule.describe(),
                 data.drop_path_schedule.describe())
        if self.cfg.train.compile:
            eager = compile_model(model, data.dropout_schedule, data.drop_path_schedule)
            log.info("torch.compile: the model, around %d modules left eager for the per-step schedules", len(eager))
        return model

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        from timm.optim import create_optimizer_v2

        o = self.cfg.optim
        extra = dict(betas=tuple(o.betas), eps=o.eps) if o.optimizer == "adamw" else dict(momentum=o.momentum)
        if o.optimizer == "adamw":  # one fused kernel per step on CUDA; torch's multi-tensor loop elsewhere
            extra |= dict(fused=True) if self.ctx.device.type == "cuda" else dict(foreach=True)
        # weight decay skips biases, norms and the tokens / position embeddings timm names in no_weight_decay()
        return create_optimizer_v2(model, opt=o.optimizer, lr=o.lr, weight_decay=o.weight_decay, **extra)

    def lr_factor(self, step: int, data: ImageStream) -> float:
        """Linear warm-up from 0, then cosine to ``min_lr``, per step; ``optim.lr`` scaled by batch/lr_batch."""
        o = self.cfg.optim
        peak = o.lr * data.plan.global_batch / o.lr_batch
        per_epoch = data.steps_per_epoch()
        warm = int(o.warmup_epochs * per_epoch)
        total = self.cfg.train.epochs * per_epoch
        if step < warm:
            lr = peak * step / warm
        else:
            progress = min(1.0, (step - warm) / max(1, total - warm))
            lr = o.min_lr + 0.5 * (peak - o.min_lr) * (1.0 + math.cos(math.pi * progress))
        return lr / o.lr

    # ------------------------------------------------------------------ training
    def loss(self, model: nn.Module, micro: ImageMicroBatch, step: StepContext | None) -> MicroResult:
        from timm.loss import SoftTargetCrossEntropy

        images, labels = micro.images, micro.labels
        mixed = self.mixup is not None and images.size(0) >= 2
        if mixed:
            if images.size(0) % 2:  # timm's batch mixup pairs images: drop one from an odd batch
                images, labels = images[:-1], labels[:-1]
            images, targets = self.mixup(images, labels)  # soft targets, label smoothing included
        logits = model(images.to(_param_dtype(model))).float()
        if images.size(0) == 0:  # every image unreadable: a zero loss still joins the gradient all-reduce
            return MicroResult(logits.sum() * 0.0, {"loss": torch.zeros((), device=logits.device)})
        loss = SoftTargetCrossEntropy()(logits, targets) if mixed else self.criterion(logits, labels)
        return MicroResult(loss, {"loss": loss.detach()})

    def begin_step(self, model: nn.Module, step: int, epoch: float, data: ImageStream) -> StepContext:
        """Set this step's scheduled rates on the live model; report the rates it now carries and, every
        ``train.log_every`` steps (beside the engine's ``perf/samples_per_s``), the loader's rate.

        The live model's sites are found by one walk at the first step (:class:`DropSites`); later steps only
        assign to those lists, and only when the schedule moves. The logged rates are read back from the sites
        (every dropout's p, which must agree, and the last block's drop-path rate), so TensorBoard shows what
        the model used, not what was meant.
        """
        wanted = (data.dropout_schedule.value(step), data.drop_path_schedule.value(step))
        if wanted != self._applied:
            if self._sites is None:
                self._sites = DropSites.of(model)
            self._sites.set_dropout(wanted[0])
            self._sites.set_drop_path(wanted[1])
            dropouts = set(self._sites.dropout_rates().values())
            if len(dropouts) > 1:
                raise RuntimeError(f"dropout modules disagree after the schedule set them: {sorted(dropouts)}")
            paths = self._sites.drop_path_rates()
            self._carried = {"drop/dropout": dropouts.pop() if dropouts else 0.0,
                             "drop/drop_path": paths[-1] if paths else 0.0}
            self._applied = wanted
        out = dict(self._carried)
        if (step + 1) % self.cfg.train.log_every == 0:
            out.update(self._loader_rate(data))
        return StepContext(step, epoch, scalars=out)

    def _loader_rate(self, data: ImageStream) -> dict[str, float]:
        """``perf/loader_samples_per_s``: images delivered per second the training loop waited on its loader,
        summed over ranks like ``perf/samples_per_s`` (every rank calls this at the same steps). Far above the
        training rate, the input pipeline keeps up; near it, training is waiting on data."""
        rate = data.loader.take_rate()
        total = all_reduce_sums({"rate": rate or 0.0}, self.ctx)["rate"]
        return {} if rate is None else {"perf/loader_samples_per_s": total}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: nn.Module, split: str, mode: str = "standard") -> dict[str, float]:
        if split != "valid":
            raise DataError(f"the ImageNet recipes have no labelled '{split}' split; evaluate --split valid")
        dev, dtype = self.ctx.device, _param_dtype(model)
        sums = torch.zeros(3, dtype=torch.float64, device=dev)  # loss, top-1 hits, top-5 hits
        n = 0  # images, counted on the host: a tensor built from it would be a copy to the device per batch
        skipped_before = self.val_loader.skipped
        for images, labels, _ in self.val_loader:
            if images.size(0) == 0:
                continue
            n += labels.numel()
            images = self.normalize(images.to(dev, non_blocking=True))
            labels = labels.to(dev, non_blocking=True)
            if self.cfg.model.channels_last and dev.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            logits = model(images.to(dtype)).float()
            top = logits.topk(min(5, logits.size(-1)), -1).indices
            hits = top == labels.unsqueeze(-1)
            sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                                 hits[:, :1].sum().double(), hits.sum().double()])
        loss, top1, top5 = sums.tolist()
        return {"loss_sum": loss, "top1_hits": top1, "top5_hits": top5, "images": float(n),
                "skipped_val_images": float(self.val_loader.skipped - skipped_before)}

    def finalize_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = sums.pop("images")
        if not n:
            raise DataError("no validation image could be read; check the val/ split of data.root")
        out = {"loss": sums.pop("loss_sum") / n, "top1": 100.0 * sums.pop("top1_hits") / n,
               "top5": 100.0 * sums.pop("top5_hits") / n}
        return {**out, **sums}

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_signature(self) -> dict:
        m = self.cfg.model
        return {"model": f"{m.name}, {self.num_classes} classes, {self.cfg.data.image_size} px"}


def build_mixup(d: ImageDataConfig, num_classes: int):
    """timm's batch mixup / cutmix as the data config asks (label smoothing folded into its soft targets);
    None when both are off. The throughput benchmark's plain loop uses it too, so the two compare like for like."""
    if not (d.mixup > 0 or d.cutmix > 0):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, prob=d.mixup_prob, switch_prob=d.mixup_switch_prob,
                 mode="batch", label_smoothing=d.smoothing, num_classes=num_classes)


def _param_dtype(module: nn.Module) -> torch.dtype:
    """bf16 under DeepSpeed's bf16 mode, else fp32: inputs must match the weights."""
    return next(module.parameters()).dtype
