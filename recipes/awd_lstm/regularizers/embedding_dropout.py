"""Word-level dropout on the embedding matrix."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .probability import check_probability


def embedding_dropout(embed: nn.Embedding, words: Tensor, p: float, training: bool,
                      mask: Optional[Tensor] = None) -> Tensor:
    """Look up ``words`` in ``embed`` after dropping whole rows of its weight.

    Dropping a row removes a word type everywhere it occurs in the batch,
    which is the AWD-LSTM regulariser; per-position dropout would not. The
    mask multiplies the weight (not the output) so gradients still reach the
    kept rows, scaled by 1/(1-p) like ordinary dropout. ``mask`` (from
    ``embedding_mask``) lets every part of a split batch drop the same words.

    Note: with ``max_norm`` set, ``F.embedding`` renormalises the *masked copy*
    in place during training, not ``embed.weight`` itself.
    """
    check_probability(p)
    weight = embed.weight
    if training and p > 0.0:
        if p == 1.0:
            weight = weight * 0.0
        else:
            if mask is None:
                mask = embedding_mask(weight.size(0), p, weight.dtype, weight.device)
            weight = weight * mask
    return F.embedding(
        words,
        weight,
        padding_idx=embed.padding_idx,
        max_norm=embed.max_norm,
        norm_type=embed.norm_type,
        scale_grad_by_freq=embed.scale_grad_by_freq,
        sparse=embed.sparse,
    )


def embedding_mask(ntoken: int, p: float, dtype: torch.dtype, device: torch.device,
                   generator: Optional[torch.Generator] = None) -> Optional[Tensor]:
    """A (ntoken, 1) keep-mask over word types scaled by 1/(1-p); None where nothing is dropped."""
    check_probability(p)
    if p == 0.0 or p == 1.0:
        return None
    return torch.empty(ntoken, 1, dtype=dtype, device=device).bernoulli_(1.0 - p, generator=generator).div_(1.0 - p)
