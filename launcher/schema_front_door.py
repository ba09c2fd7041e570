"""The wire types of the front door (/v1, /upstream): the models it lists and the requests it answered."""

from __future__ import annotations

from launcher.schema import WireModel


class RequestRecord(WireModel):
    """One request the front door (/v1, /upstream) answered: `GET /requests` lists the recent ones."""

    time: str  # when it arrived
    model: str  # the configured model it was routed to
    instance: str | None  # None: answered by the front door itself (404, 429, 503)
    method: str
    path: str
    status: int
    streamed: bool
    ttfb_ms: float | None  # arrival to the first byte of the upstream's body
    duration_ms: float
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    tokens_per_s: float | None = None  # generation speed, as the server reports it where it does


class ServedModel(WireModel):
    """One entry of a front door's `GET /v1/models`: a model or an alias, with its state; ``peer`` names
    the launcher that serves it when that is not this one."""

    id: str
    state: str
    aliases: list[str] = []
    alias_of: str | None = None
    peer: str | None = None


class ModelList(WireModel):
    """`GET /v1/models`, OpenAI's list (only the fields a launcher reads of a peer's)."""

    data: list[ServedModel]
