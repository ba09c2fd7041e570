"""What crosses the wire: the one typed schema of the REST API, shared by the daemon, the client and the CLI.
This module holds the base of its types and the error body every endpoint answers with; each area's types
are in a module of their own (schema_instances, schema_plans, schema_reload, schema_front_door, schema_rpc,
schema_gpus).

Field names carry their units. These modules import pydantic and nothing heavier, so the command line can
use them without loading the planner, the GPU libraries or the web framework.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class WireModel(BaseModel):
    # Validators are built on first use: a command pays only for the types it reads.
    model_config = ConfigDict(defer_build=True)


class ErrorBody(WireModel):
    """Every error the API answers: one sentence, and a hint where there is one."""

    detail: str
    hint: str | None = None
