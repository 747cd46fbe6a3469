"""AWD-LSTM regularisers (Merity et al. 2017) for current PyTorch."""

from .activation import activation_regularization, temporal_activation_regularization
from .embedding_dropout import embedding_dropout
from .locked_dropout import LockedDropout
from .weight_drop import WeightDropLSTM

__all__ = [
    "LockedDropout",
    "WeightDropLSTM",
    "activation_regularization",
    "embedding_dropout",
    "temporal_activation_regularization",
]
