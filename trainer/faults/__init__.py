"""What keeps a long run alive or ends it cleanly: preemption signals, lost ranks, non-finite losses."""

from .inject import FaultPlan
from .preemption import PreemptionSignals
from .step_guard import StepGate, StepVerdict, agree_on_step
from .watchdog import EXIT_LOST_RANK, PeerWatchdog

__all__ = ["EXIT_LOST_RANK", "FaultPlan", "PeerWatchdog", "PreemptionSignals", "StepGate", "StepVerdict",
           "agree_on_step"]
