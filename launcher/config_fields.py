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
# The period of something the daemon does again and again (a GPU reading, a health probe, a peer's read):
# under 10 ms its loop would spin, holding a core and the event loop for nothing.
Period = Annotated[float, Field(ge=0.01, allow_inf_nan=False)]
# Memory: at most 1 PiB, past any GPU's or host's by far, and within a float's range (plans compute with floats:
# a larger integer failed them with an OverflowError).
MEMORY_MAX_MIB = 2**30
MemoryMib = Annotated[int, Field(ge=0, le=MEMORY_MAX_MIB)]
# The same bound in GiB, for a budget taken in whole bytes (an infinite or overflowing one cannot be).
MemoryGib = Annotated[float, Field(ge=0, le=MEMORY_MAX_MIB // 1024, allow_inf_nan=False)]


class StrictSettings(BaseModel):
    # defer_build: a model's validator is built when first used, so a command that reads only the daemon
    # section never pays for the others' (pydantic builds them in about 20 ms together).
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)
