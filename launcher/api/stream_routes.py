"""The API's streams: the events (server-sent, the recent ones first) and a server's log (its tail, or
followed), without what the servers said for a caller without the token."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

from launcher.api.access import Access
from launcher.api.answers import Authorization, InstanceName, errors, text
from launcher.api.redact import SERVER_WORDS_HIDDEN, without_server_words
from launcher.events import Bus
from launcher.schema_instances import Event
from launcher.statedir import logs
from launcher.supervise.manager import Manager
from launcher.supervise.table import InstanceView

# Each server-sent event: its kind, and an Event (launcher.schema_instances) as JSON.
_SSE_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {"event": {"type": "string"}, "data": {"type": "string", "contentMediaType": "application/json"}},
}


def stream_routes(
    manager: Manager, instances: Mapping[str, InstanceView], event_bus: Bus[Event], access: Access
) -> APIRouter:
    routes = APIRouter()

    @routes.get(
        "/events",
        response_class=StreamingResponse,
        responses={
            200: {"content": {"text/event-stream": {"schema": _SSE_EVENT}}, "description": "server-sent events"},
            **access.read,
            **errors(422),
        },
    )
    async def events(
        recent: Annotated[int, Query(ge=0, le=500)] = 0, follow: bool = True, authorization: Authorization = None
    ) -> StreamingResponse:
        """Server-sent events: state changes, exits, errors, thermal warnings; ``recent`` past ones first.
        With ``follow=false`` the stream ends after those (a script's look at what just happened)."""
        queue = event_bus.subscribe() if follow else None
        past = event_bus.recent(recent)
        hide_server_words = access.hides_server_output(authorization)

        def shown_event(event: Event) -> Event:
            if not hide_server_words or event.instance is None:
                return event
            about = instances.get(event.instance)
            if about is None:  # removed by a reload, and what its server said with it: show none of the message
                return event.model_copy(update={"message": SERVER_WORDS_HIDDEN})
            return without_server_words(event, about.server_words)

        async def stream() -> AsyncIterator[str]:
            try:
                for event in past:
                    yield _sse(shown_event(event))
                while queue is not None:
                    yield _sse(shown_event(await queue.get()))
            finally:
                if queue is not None:
                    event_bus.unsubscribe(queue)

        return StreamingResponse(stream(), media_type="text/event-stream")

    # A server's log may hold its environment and the prompts it served: only the token holder reads it.
    @routes.get(
        "/instances/{name}/logs",
        response_class=StreamingResponse,  # no media type of its own: the error bodies are documented as JSON
        dependencies=[Depends(access.authorised)],
        responses={**text("text/plain", "the server's log"), **access.read, **access.refused(404, 422)},
    )
    async def instance_logs(
        name: InstanceName, tail: Annotated[int, Query(ge=0, le=100_000)] = 100, follow: bool = False
    ) -> Response:
        path = manager.get(name).log_path
        head = "".join(f"{line}\n" for line in logs.tail(path, tail))
        if not follow:
            return PlainTextResponse(head)

        async def stream() -> AsyncIterator[str]:
            yield head
            async for line in logs.follow(path):
                yield f"{line}\n"

        return StreamingResponse(stream(), media_type="text/plain")

    return routes


def _sse(event: Event) -> str:
    return f"event: {event.kind}\ndata: {event.model_dump_json()}\n\n"
