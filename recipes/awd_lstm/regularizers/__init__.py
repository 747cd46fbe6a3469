"""AWD-LSTM regularisers (Merity et al. 2017) for current PyTorch."""

from .activation import activation_regularization, temporal_activation_regularization
from .embedding_dropout import embedding_dropout, embedding_mask
from .locked_dropout import LockedDropout
from .weight_drop import WeightDropLSTM

__all__ = [
    "LockedDropout",
    "WeightDropLSTM",
    "activation_regularization",
    "embedding_dropout",
    "embedding_mask",
    "temporal_activation_regularization",
]
