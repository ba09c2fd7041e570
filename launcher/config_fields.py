"""The pieces every settings section is built of: the strict, frozen base model and the constrained
numbers and ports its keys take.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

Port = Annotated[int, Field(ge=1, le=65535)]
# Finite: `.inf` would make a wait (a drain, a stop, a queue) last as long as a client cares to hold it.
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class StrictSettings(BaseModel):
    # defer_build: a model's validator is built when first used, so a command that reads only the daemon
    # section never pays for the others' (pydantic builds them in about 20 ms together).
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)
