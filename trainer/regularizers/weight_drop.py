"""LSTM with DropConnect on the recurrent weight matrix."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .dropconnect import DropConnectMask

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
    from ``DropConnectMask``, which is several times cheaper than ``F.dropout`` on CPU.
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
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Same init as nn.LSTM so results are comparable with the reference."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for w in self.parameters():
            nn.init.uniform_(w, -bound, bound)

    def forward(
        self,
        x: Tensor,
        hx: Optional[Tuple[Tensor, Tensor]] = None,
        weight_drop: Optional[float] = None,
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        rate = self.weight_drop if weight_drop is None else float(weight_drop)
        if hx is None:
            zeros = x.new_zeros(1, x.size(1), self.hidden_size)
            hx = (zeros, zeros)
        w_hh = self.weight_hh
        if self.training and rate > 0.0:
            w_hh = self._drop_connect(w_hh, rate)
        output, h_n, c_n = _lstm(
            x,
            tuple(hx),
            [self.weight_ih, w_hh, self.bias_ih, self.bias_hh],
            True,  # has_biases
            1,  # num_layers
            0.0,  # inter-layer dropout (none: single layer)
            self.training,
            False,  # bidirectional
            False,  # batch_first
        )
        return output, (h_n, c_n)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, weight_drop={self.weight_drop}"
