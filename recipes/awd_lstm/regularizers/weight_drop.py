"""LSTM with DropConnect on the recurrent weight matrix."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .dropconnect import DropConnectMask, apply_mask

# torch._VF.lstm is the op nn.LSTM itself dispatches to (cuDNN on GPU);
# torch.lstm is its public alias on builds where _VF lacks it.
_lstm = getattr(getattr(torch, "_VF", None), "lstm", None) or torch.lstm


class WeightDropLSTM(nn.Module):
    """Single-layer LSTM whose ``weight_hh`` gets one dropout mask per forward.

    The original AWD-LSTM deleted and re-registered the parameter to apply the
    mask, which breaks on current PyTorch and under ZeRO (parameters get
    flattened/partitioned). Here the parameters stay ordinary ``nn.Parameter``s
    and the masked matrix is passed functionally to the fused LSTM op, so the
    fast kernel is kept and gradients flow to ``weight_hh`` through the mask. The mask comes
    from ``DropConnectMask``, which is several times cheaper than ``F.dropout`` on CPU; a caller
    that splits one batch over ranks or micro-batches draws it once (``draw_mask``) and passes it
    to every part. On cuDNN the weights go in one flat buffer laid out as cuDNN wants it
    (``_CudnnWeights``), so the kernel does not re-pack them on every call.
    """

    def __init__(self, input_size: int, hidden_size: int, weight_drop: float = 0.0):
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        # Plain float so a schedule can change it between steps.
        self.weight_drop = float(weight_drop)
        gates = 4 * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gates, input_size))
        self.weight_hh = nn.Parameter(torch.empty(gates, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(gates))
        self.bias_hh = nn.Parameter(torch.empty(gates))
        self._drop_connect = DropConnectMask()
        self._cudnn: Optional[_CudnnWeights] = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Same init as nn.LSTM so results are comparable with the reference."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for w in self.parameters():
            nn.init.uniform_(w, -bound, bound)

    def draw_mask(self, rate: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Optional[Tensor]:
        """A DropConnect mask for ``weight_hh`` (None: nothing dropped). It lives in a buffer the next draw
        overwrites, so draw the next one only after the backward of every forward that used this one."""
        rate = self.weight_drop if rate is None else float(rate)
        return self._drop_connect.mask(self.weight_hh, rate, generator)

    def forward(
        self,
        x: Tensor,
        hx: Optional[Tuple[Tensor, Tensor]] = None,
        weight_drop: Optional[float] = None,
        mask: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        if hx is None:
            zeros = x.new_zeros(1, x.size(1), self.hidden_size)
            hx = (zeros, zeros)
        if self.training and mask is None:
            mask = self.draw_mask(weight_drop)
        elif not self.training:
            mask = None
        weights = self._weights(x, mask)
        output, h_n, c_n = _lstm(
            x,
            tuple(hx),
            weights,
            True,  # has_biases
            1,  # num_layers
            0.0,  # inter-layer dropout (none: single layer)
            self._kernel_training(),
            False,  # bidirectional
            False,  # batch_first
        )
        return output, (h_n, c_n)

    def _kernel_training(self) -> bool:
        """The fused kernel's train flag: on wherever a backward may follow, in eval mode too (cuDNN refuses an
        RNN backward from an inference-mode forward; a dropout-free gradient, as the gradient analysis takes,
        is eval mode with gradients). It only decides what is kept for backward: this op has no dropout."""
        return self.training or (torch.is_grad_enabled() and self.weight_hh.requires_grad)

    def _weights(self, x: Tensor, mask: Optional[Tensor]) -> list[Tensor]:
        params = [self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh]
        if torch.cudnn_is_acceptable(x):  # the test the LSTM op itself takes cuDNN by (bf16 included, cuDNN 9.13+)
            if self._cudnn is None or not self._cudnn.fits(self.weight_hh):
                self._cudnn = _CudnnWeights(self.weight_ih, self.weight_hh)
            return self._cudnn.write(params, mask)
        if mask is None:
            return params
        params[1] = apply_mask(self.weight_hh, mask, self._drop_connect.out_buffer(self.weight_hh))
        return params

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, weight_drop={self.weight_drop}"


class _CudnnWeights:
    """One flat buffer in cuDNN's weight layout, holding ``weight_ih``, masked ``weight_hh`` and the biases.

    cuDNN takes the weights as one buffer; handed separate tensors (or the masked copy of ``weight_hh``), it packs
    them into a fresh one on every call and warns. Here each forward writes the current weights, the mask applied
    on the way, straight into the buffer where cuDNN looks (``torch._cudnn_rnn_flatten_weight`` gives the layout),
    and the gradient flows back to the parameters through ``_WriteFlat``.
    """

    def __init__(self, weight_ih: Tensor, weight_hh: Tensor, layout: Optional[list] = None):
        hidden, inp = weight_hh.size(1), weight_ih.size(1)
        opts = dict(dtype=weight_hh.dtype, device=weight_hh.device)
        shapes = [(4 * hidden, inp), (4 * hidden, hidden), (4 * hidden,), (4 * hidden,)]
        if layout is None:
            views = [torch.empty(shape, **opts) for shape in shapes]
            with torch.no_grad():  # re-points the views into one buffer in cuDNN's layout (mode 2: LSTM)
                self.flat = torch._cudnn_rnn_flatten_weight(views, 4, inp, 2, hidden, 0, 1, False, False)
            base = self.flat.storage_offset()
            layout = [(v.storage_offset() - base, tuple(v.shape)) for v in views]
        else:  # an explicit layout (tests exercise the write and its gradient on CPU this way)
            self.flat = torch.empty(max(off + math.prod(shape) for off, shape in layout), **opts)
        self.layout = layout
        self._key = (weight_hh.shape, weight_hh.dtype, weight_hh.device)

    def fits(self, weight_hh: Tensor) -> bool:
        return self._key == (weight_hh.shape, weight_hh.dtype, weight_hh.device)

    def write(self, params: list[Tensor], mask: Optional[Tensor]) -> list[Tensor]:
        self.flat.detach_()  # the previous forward's history (already backpropagated)
        flat = _WriteFlat.apply(self.flat, self.layout, mask, *params)
        return [flat.narrow(0, off, math.prod(shape)).view(shape) for off, shape in self.layout]


class _WriteFlat(torch.autograd.Function):
    """Copy the four weights into ``flat`` at ``layout`` (``weight_hh`` times ``mask`` when given); the gradient
    of ``flat`` is cut back into the four weights' gradients."""

    @staticmethod
    def forward(ctx, flat, layout, mask, *weights):
        for i, ((off, shape), w) in enumerate(zip(layout, weights)):
            dst = flat.narrow(0, off, math.prod(shape)).view(shape)
            if i == 1 and mask is not None:
                torch.mul(w, mask, out=dst)
            else:
                dst.copy_(w)
        ctx.mark_dirty(flat)
        ctx.layout = layout
        ctx.save_for_backward(mask)
        return flat

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        grads = [grad.narrow(0, off, math.prod(shape)).view(shape) for off, shape in ctx.layout]
        if mask is not None:
            grads[1] = (grads[1] * mask).to(grad.dtype)
        return (None, None, None, *grads)
