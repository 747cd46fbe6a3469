"""Variational ("locked") dropout for time-major sequences."""

from __future__ import annotations

from torch import Tensor, nn


class LockedDropout(nn.Module):
    """Dropout whose mask is shared across all time steps.

    Resampling the mask at every step (plain dropout) destroys the recurrent
    signal; one mask per sequence regularises the units instead (Gal &
    Ghahramani 2016). The rate is an argument of ``forward`` rather than
    module state so a schedule can change it between steps.
    """

    def forward(self, x: Tensor, p: float) -> Tensor:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        if not self.training or p == 0.0:
            return x
        if p == 1.0:
            return x * 0.0
        if x.dim() != 3:
            raise ValueError(f"expected (T, B, H) input, got shape {tuple(x.shape)}")
        mask = x.new_empty(1, x.size(1), x.size(2)).bernoulli_(1.0 - p)
        return x * mask.div_(1.0 - p)
