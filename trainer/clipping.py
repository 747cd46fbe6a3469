"""Gradient clipping and DeepSpeed's update without a host read-back.

A training step reads one value back from the device: the step guard's agreement (trainer/faults/step_guard.py).
DeepSpeed's own clipping of plain fp32 gradients (ZeRO 0) builds two tensors from host numbers on the device
every step (two blocking copies), and its BF16 optimizer (bf16 at ZeRO 0 or 1) checks the gradient norm on the
host (``bool(norm)``, ``if clip_coef < 1`` and one more copy) before every update. Where either of them would run,
the loop clips instead, on the device, after the last backward and before ``engine.step()`` (DeepSpeed's
``gradient_clipping`` is then 0), and the norm's finiteness travels in the step guard's one agreement, so a
non-finite gradient vetoes the update on every rank as DeepSpeed's own overflow check would have skipped it.
ZeRO 1 and 2's optimizers (fp32, and bf16 at stage 2) keep DeepSpeed's clipping: they read back their own
overflow flag anyway.
"""

from __future__ import annotations

import logging
import types

import torch

log = logging.getLogger("trainer")

# What the BF16 optimizer's update is made of in the DeepSpeed versions this project runs on (0.19.x)
_BF16_PARTS = ("fp32_groups_flat_partition", "fp32_groups_gradient_flat_partition", "grad_acc_dtype",
               "get_grads_for_norm", "_lazy_init_hp_params_optimizer_state", "update_lp_params", "clear_hp_grads")


def clips_on_device(precision: str, zero_stage: int) -> bool:
    """Whether the loop clips (and DeepSpeed's ``gradient_clipping`` is 0): plain gradients at ZeRO 0, or
    DeepSpeed's BF16 optimizer, which bf16 uses at ZeRO 0 and 1 (trainer/precision.py)."""
    return zero_stage <= 1 if precision == "bf16" else zero_stage == 0


def _is_bf16_optimizer(optimizer) -> bool:
    return type(optimizer).__name__ == "BF16_Optimizer"


class DeviceClipper:
    """Clips the gradients the next ``engine.step()`` applies, with every number kept on the device.

    ``clip()`` returns the global norm before clipping (a device scalar), or None where nothing was measured
    (clipping off, outside a BF16 optimizer). Under DeepSpeed's BF16 optimizer the norm is taken on its fp32
    gradients (all-reduced, whole on every rank) even with clipping off, since its update no longer checks them.
    """

    def __init__(self, engine, max_norm: float):
        self.engine = engine
        self.max_norm = float(max_norm)
        self.bf16 = _is_bf16_optimizer(engine.optimizer) and _install_bf16_update(engine.optimizer)

    def _gradients(self) -> list[torch.Tensor]:
        if self.bf16:
            return self.engine.optimizer.get_grads_for_norm(for_clipping=True)
        return [p.grad for p in self.engine.module.parameters() if p.grad is not None]

    def clip(self) -> torch.Tensor | None:
        if not (self.max_norm > 0 or self.bf16):
            return None
        grads = self._gradients()
        if not grads:
            return None
        norm = torch.nn.utils.get_total_norm(grads)  # foreach kernels on CUDA, per tensor elsewhere
        if self.max_norm > 0:  # torch's clip_grad_norm_ arithmetic, on the gradients themselves (not on .grad)
            torch._foreach_mul_(grads, (self.max_norm / (norm + 1e-6)).clamp(max=1.0))
        if self.bf16:
            self.engine.optimizer._global_grad_norm = norm  # what DeepSpeed's own step would have recorded
        return norm


def _install_bf16_update(optimizer) -> bool:
    """Replace the BF16 optimizer's ``step`` by its update alone: the norm check and clipping before it are the
    loop's now (the step guard vetoes a non-finite gradient through the base optimizer, the same on every rank).
    False, with a warning, on a DeepSpeed whose BF16 optimizer is built otherwise: its own step then stays."""
    missing = [name for name in _BF16_PARTS if not hasattr(optimizer, name)]
    if missing or getattr(optimizer, "_uses_muon", False) or getattr(optimizer, "has_moe_layers", False):
        log.warning("DeepSpeed's BF16 optimizer here lacks %s: its own gradient check stays, reading the norm back "
                    "to the host every step", ", ".join(missing) or "the plain layout")
        return False

    def step(self, closure=None):
        if closure is not None:
            raise NotImplementedError("the BF16 optimizer takes no closure")
        self.overflow = False
        for param, grad in zip(self.fp32_groups_flat_partition, self.fp32_groups_gradient_flat_partition):
            param.grad = grad if grad.dtype == param.dtype else grad.to(param.dtype)
        self.optimizer.step()
        if self.grad_acc_dtype is not torch.float32:
            for param in self.fp32_groups_flat_partition:
                param.grad = None
        self._lazy_init_hp_params_optimizer_state()
        self.update_lp_params()
        self.clear_hp_grads()

    optimizer.step = types.MethodType(step, optimizer)
    return True
