"""The front door's settings (`router:`): its API keys, and whether idle models may be evicted."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from launcher.config_fields import StrictSettings


class RouterSettings(StrictSettings):
    """The OpenAI-compatible front door on the daemon's port."""

    api_keys: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list,
        description="Keys for `/v1` and `/upstream` (bearer or `x-api-key`; the API token is taken too). None: "
        "open on loopback; on a public bind the API token is then the only key.",
    )
    evict: Literal["idle", "never"] = Field(
        default="idle",
        description="`idle`: an on-demand model with no request in flight may be stopped to make room for another.",
    )
