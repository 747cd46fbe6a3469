"""Activation (AR) and temporal activation (TAR) regularisation."""

from __future__ import annotations

import torch
from torch import Tensor


def _acc_dtype(x: Tensor) -> torch.dtype:
    # Squares of bf16/fp16 activations lose too much precision; use >= fp32.
    return torch.promote_types(x.dtype, torch.float32)


def activation_regularization(dropped_output: Tensor, alpha: float) -> Tensor:
    """L2 penalty on the (dropped) last-layer outputs: keeps activations small."""
    if alpha == 0:
        return torch.zeros((), dtype=_acc_dtype(dropped_output), device=dropped_output.device)
    return alpha * dropped_output.to(_acc_dtype(dropped_output)).pow(2).mean()


def temporal_activation_regularization(raw_output: Tensor, beta: float) -> Tensor:
    """L2 penalty on step-to-step changes of the undropped outputs (time-major).

    Uses the raw output because dropout noise would dominate the differences.
    Sequences shorter than two steps have no differences and give 0.
    """
    if beta == 0 or raw_output.size(0) < 2:
        return torch.zeros((), dtype=_acc_dtype(raw_output), device=raw_output.device)
    h = raw_output.to(_acc_dtype(raw_output))
    return beta * (h[1:] - h[:-1]).pow(2).mean()
