"""NT-ASGD's config keys (``optim.averaging`` ... ``optim.stop_on_nonmono``): a recipe turns the feature on for its
runs by mixing them into its optimizer section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..config import Section


class NTASGDKeys(Section):
    averaging: Literal["none", "nt_asgd"] = Field("none", description="iterate averaging (NT-ASGD)")
    nonmono: int = Field(5, ge=1, description="NT-ASGD: evaluations excluded from the best it compares against")
    t0: int = Field(0, ge=0, description="NT-ASGD: average from this optimizer step whatever the trigger; 0 = trigger")
    stop_on_nonmono: bool = Field(False, description="stop when the trigger fires while averaging (fine-tuning)")
