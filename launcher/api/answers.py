"""What the API's paths share: an answer that is already JSON, the documentation of the error statuses and
of text bodies, and the types of an instance's name and of the Authorization header."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Header, Path
from fastapi.responses import Response

from launcher.schema import ErrorBody

Responses = dict[int | str, dict[str, Any]]
JSON = "application/json"

InstanceName = Annotated[str, Path(description="an instance: a configured model, or a replica NAME@N")]
Authorization = Annotated[str | None, Header(description="Bearer <the API token>")]


def errors(*statuses: int) -> Responses:
    what = {
        400: "the body is not JSON",
        401: "the API token is missing or wrong",
        404: "no such instance, model or GPU",
        409: "the act makes no sense in the instance's state (or the daemon's: it is stopping)",
        422: "a parameter is invalid, or the model's configuration points at something missing",
        500: "an error the launcher did not foresee, said in one sentence",
        503: "the machine refuses: the model does not fit the GPUs, or no port is free",
    }
    return {status: {"model": ErrorBody, "description": what[status]} for status in statuses}


def text(media_type: str, description: str) -> Responses:
    return {200: {"content": {media_type: {"schema": {"type": "string"}}}, "description": description}}


def json_answer(body: str | bytes, status_code: int = 200) -> Response:
    """An answer serialised already (the answers are ours, typed: not validated again on the way out,
    which halves the cost of a request; the path's response model still describes them)."""
    return Response(body, status_code=status_code, media_type=JSON)
