"""Word-level dropout on the embedding matrix."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def embedding_dropout(embed: nn.Embedding, words: Tensor, p: float, training: bool) -> Tensor:
    """Look up ``words`` in ``embed`` after dropping whole rows of its weight.

    Dropping a row removes a word type everywhere it occurs in the batch,
    which is the AWD-LSTM regulariser; per-position dropout would not. The
    mask multiplies the weight (not the output) so gradients still reach the
    kept rows, scaled by 1/(1-p) like ordinary dropout.

    Note: with ``max_norm`` set, ``F.embedding`` renormalises the *masked copy*
    in place during training, not ``embed.weight`` itself.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    weight = embed.weight
    if training and p > 0.0:
        if p == 1.0:
            weight = weight * 0.0
        else:
            mask = weight.new_empty(weight.size(0), 1).bernoulli_(1.0 - p).div_(1.0 - p)
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
