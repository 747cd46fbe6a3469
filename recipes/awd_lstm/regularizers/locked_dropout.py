"""Variational ("locked") dropout for time-major sequences."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .probability import check_probability


class LockedDropout(nn.Module):
    """Dropout whose mask is shared across all time steps.

    Resampling the mask at every step (plain dropout) destroys the recurrent
    signal; one mask per sequence regularises the units instead (Gal &
    Ghahramani 2016). The rate is an argument of ``forward`` rather than
    module state so a schedule can change it between steps. A caller that
    splits one batch over ranks or micro-batches passes its columns of a mask
    drawn for the whole batch (``draw_mask``), so the split does not change it.
    """

    def forward(self, x: Tensor, p: float, mask: Optional[Tensor] = None) -> Tensor:
        check_probability(p)
        if not self.training or p == 0.0:
            return x
        if p == 1.0:
            return x * 0.0
        if x.dim() != 3:
            raise ValueError(f"expected (T, B, H) input, got shape {tuple(x.shape)}")
        if mask is None:
            mask = self.draw_mask(x.size(1), x.size(2), p, x.dtype, x.device)
        return x * mask

    @staticmethod
    def draw_mask(batch: int, width: int, p: float, dtype: torch.dtype, device: torch.device,
                  generator: Optional[torch.Generator] = None) -> Optional[Tensor]:
        """A (1, batch, width) keep-mask scaled by 1/(1-p); None where nothing is dropped."""
        check_probability(p)
        if p == 0.0 or p == 1.0:
            return None
        mask = torch.empty(1, batch, width, dtype=dtype, device=device).bernoulli_(1.0 - p, generator=generator)
        return mask.div_(1.0 - p)
