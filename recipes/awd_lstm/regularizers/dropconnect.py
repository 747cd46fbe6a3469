"""DropConnect masks that cost a fraction of ``F.dropout`` on large weight matrices.

``F.dropout`` on CPU draws one Bernoulli sample per element (~14 ns each here) and allocates a
fresh mask every call; on AWD-LSTM's 11M recurrent weights that alone was ~17-24% of a training
step. This mask takes 16 random bits per element (four per 64-bit draw), thresholds them with
integer ops, and writes the scaled keep-mask's bit pattern straight into a buffer reused across
steps, with no float conversion and no allocation; the masked weight goes into a reused buffer
too (a fresh 21 MB tensor per layer per step costs ~10 ms of page faults here). The drop
probability is ``rate`` rounded to a multiple of 2**-16 and the scale is the exact inverse of the
resulting keep probability, so the masked weight is unbiased. Where a 16-bit weight dtype cannot hold
that scale as exactly as fp32 (bf16 at most rates), the mask is held in fp32 and the product rounded
once into the weight's dtype, so a bf16 run scales by the same inverse as an fp32 one. The same code runs on
GPU (all ops are elementwise on device).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_BITS = 16
_LEVELS = 1 << _BITS
_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def quantized_keep(rate: float) -> tuple[int, float]:
    """(dropped levels out of 2**16, keep probability) that the mask actually uses for ``rate``."""
    dropped = min(round(rate * _LEVELS), _LEVELS)
    return dropped, (_LEVELS - dropped) / _LEVELS


def _bit_pattern(value: float, dtype: torch.dtype) -> int:
    """``value`` in ``dtype`` read back as the signed integer with the same bits."""
    return int(torch.tensor(value, dtype=dtype).view(_INT_OF_SIZE[dtype.itemsize]).item())


class _MaskInto(torch.autograd.Function):
    """``out = weight * mask`` written into ``out``; the gradient reaches ``weight`` only."""

    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor, out: Tensor) -> Tensor:
        torch.mul(weight, mask, out=out)
        ctx.mark_dirty(out)
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mask,) = ctx.saved_tensors
        return (grad * mask).to(grad.dtype), None, None


def apply_mask(weight: Tensor, mask: Tensor, out: Tensor) -> Tensor:
    """``weight * mask`` written into ``out`` (same shape and dtype as ``weight``), differentiable w.r.t. ``weight``."""
    out.detach_()  # drop the previous step's (already backpropagated) history
    return _MaskInto.apply(weight, mask, out)


class DropConnectMask:
    """Draws a new scaled keep-mask for one weight per call, into storage it keeps between calls.

    Masks and masked weights alias that storage: the next call overwrites them. Autograd's
    version counter guards this: a backward through a mask that was redrawn since raises instead
    of computing a wrong gradient (one mask per forward, each forward followed by its backward, as
    training does, never hits it).
    """

    def __init__(self) -> None:
        self._words: Optional[Tensor] = None  # random 64-bit words, viewed as 16-bit draws
        self._mask: Optional[Tensor] = None  # integer buffer holding the mask's float bit patterns
        self._out: Optional[Tensor] = None  # the masked weight

    def __call__(self, weight: Tensor, rate: float, generator: Optional[torch.Generator] = None) -> Tensor:
        """``weight`` with a fresh mask applied (differentiable w.r.t. ``weight``)."""
        mask = self.mask(weight, rate, generator)
        if mask is None:
            return weight
        return apply_mask(weight, mask, self.out_buffer(weight))

    def out_buffer(self, weight: Tensor) -> Tensor:
        """The reused storage a masked copy of ``weight`` is written into."""
        return self._buffer("_out", tuple(weight.shape), weight.dtype, weight.device)

    def mask(self, weight: Tensor, rate: float, generator: Optional[torch.Generator] = None) -> Optional[Tensor]:
        """A mask with values 0 and 1/keep shaped like ``weight``; None when nothing is dropped. Its dtype is the
        weight's unless that holds 1/keep less exactly than fp32 does (bf16, fp16 at most rates): then fp32. ``generator`` (default: the global one) draws it."""
        dropped, keep = quantized_keep(rate)
        if dropped == 0:
            return None
        if dropped == _LEVELS:
            raise ValueError(f"DropConnect rate {rate} drops every weight: use a rate below 1")
        if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"DropConnect needs a floating-point weight, got {weight.dtype}")
        scale = 1.0 / keep
        as_fp32 = float(torch.tensor(scale, dtype=torch.float32))
        narrow = weight.dtype.itemsize < 4 and float(torch.tensor(scale, dtype=weight.dtype)) != as_fp32
        dtype = torch.float32 if narrow else weight.dtype
        n = weight.numel()
        int_dtype = _INT_OF_SIZE[dtype.itemsize]
        words = self._buffer("_words", ((n + 3) // 4,), torch.int64, weight.device)
        with torch.no_grad():
            words.random_(-(1 << 63), None, generator=generator)  # full 64-bit range: four uniform int16s
            draws = words.view(torch.int16)[:n]
            # draws are uniform on [-2**15, 2**15): keep the top (LEVELS - dropped) of them.
            # clamp to {threshold-1, threshold} then shift to {0, 1}, in place, in int16.
            threshold = dropped - (_LEVELS >> 1)
            keep_bit = draws.clamp_(threshold - 1, threshold).sub_(threshold - 1)
            pattern = _bit_pattern(scale, dtype)
            if int_dtype is torch.int16:
                bits = keep_bit.mul_(pattern)
            else:
                bits = self._buffer("_mask", (n,), int_dtype, weight.device)
                bits.copy_(keep_bit).mul_(pattern)
        return bits.view(dtype).view(weight.shape)

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        buf = getattr(self, name)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(shape, dtype=dtype, device=device)
            setattr(self, name, buf)
        return buf
