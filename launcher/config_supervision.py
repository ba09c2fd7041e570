"""How a model's server is watched and started again (`models.NAME.health`, `models.NAME.restart`): its
health probes, stalls and load timeout, and the restart policy and its backoff.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from launcher.config_fields import NonNegative, Period, Positive, StrictSettings


class RestartSettings(StrictSettings):
    """When a server that ended is started again."""

    policy: Literal["always", "on-failure", "never"] = Field(
        default="on-failure", description="Which ends are followed by a restart."
    )
    backoff_initial: NonNegative = Field(
        default=1.0, description="Seconds before the second restart in a row; each further one doubles it."
    )
    backoff_max: NonNegative = Field(default=60.0, description="The longest wait between two restarts.")
    burst: Annotated[int, Field(ge=0)] = Field(
        default=5, description="More than this many restarts within `interval` seconds leave the instance `failed`."
    )
    interval: Positive = Field(default=300.0, description="The window, in seconds, that `burst` counts restarts in.")
    reset_after: NonNegative = Field(
        default=60.0, description="Ready for this long, the instance counts as healthy again and backoff starts over."
    )

    @model_validator(mode="after")
    def _backoff_order(self) -> RestartSettings:
        if self.backoff_initial > self.backoff_max:
            raise ValueError("backoff_initial must not exceed backoff_max")
        return self


class HealthSettings(StrictSettings):
    """How a server's health is probed."""

    interval: Period = Field(default=5.0, description="Seconds between two health probes of a ready server.")
    timeout: Positive = Field(default=5.0, description="Seconds a probe may take before it counts as failed.")
    failures: Annotated[int, Field(ge=1)] = Field(
        default=3, description="Failed probes in a row before a ready instance is declared unhealthy and replaced."
    )
    stall_s: NonNegative = Field(
        default=60.0,
        description="Seconds a request in flight may go without a byte of its answer while the server's `/slots` "
        "shows no progress (tokens decoded or prompt tokens processed) before it is ended as stalled (a 504); 0: off.",
    )
    stall_failures: Annotated[int, Field(ge=1)] = Field(
        default=2,
        description="Stalls since the server became ready before it is replaced (drained of its other requests first).",
    )
    # Loading a 70B model from disk takes minutes.
    load_timeout: Positive = Field(
        default=900.0,
        description="Seconds a server may take to load; past this it is killed and the start counts as failed.",
    )
