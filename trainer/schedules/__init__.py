"""Drop-rate schedules (early / late dropout and stochastic depth, Liu et al. 2023): a rate as a function of the
step, and the config of when a recipe's own rates apply. Where the rates go is each family's (the ImageNet recipes'
``drop_sites``, AWD-LSTM's model attributes)."""

from .drop import DropSchedule, DropTiming, Mode, Shape, check_cutoff

__all__ = ["DropSchedule", "DropTiming", "Mode", "Shape", "check_cutoff"]
