"""NT-ASGD (Merity et al. 2017): plain SGD until validation stops improving, then the average of the iterates.
``averager``: the trigger and the average; ``sharded_average``: the average cut over the data-parallel ranks;
``config``: the keys a recipe mixes into its optimizer section; ``callback``: how it attaches to the loop."""

from .averager import NTASGD, nonmono_triggered
from .callback import NTASGDCallback
from .config import NTASGDKeys

__all__ = ["NTASGD", "NTASGDCallback", "NTASGDKeys", "nonmono_triggered"]
