"""The live dashboard's part of the API: `GET /ui` (the page and its files, from launcher/ui/ in the
package, open without the token: the page asks for it), `GET /gpus/stream` (every GPU sample as a
server-sent event) and `GET /gpus/topology` (links between GPUs, the limits they are watched against).

The page reads everything else through the API like any client; it sends the token where one is needed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Annotated, Any

from fastapi import FastAPI, Query
from fastapi.responses import Response, StreamingResponse

from launcher.config_gpus import GpuSettings
from launcher.errors import NotFoundError
from launcher.events import Bus
from launcher.gpu.sampler import Sampler
from launcher.schema_gpus import GpuLink, GpuSample, GpuTopology
from launcher.supervise.table import InstanceTable

Responses = dict[int | str, dict[str, Any]]

# The page's files and their media types: nothing else under /ui is served.
_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "draw.js": "text/javascript; charset=utf-8",
    "panels.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# The browser itself refuses anything but this daemon: no CDN, no request to another host.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "Cache-Control": "no-cache",  # revalidated on every load: an upgraded daemon serves its new page at once
    "X-Content-Type-Options": "nosniff",
}
# A stream that does not keep up loses samples rather than holding memory for them.
_QUEUE_SAMPLES = 1000

_SAMPLE_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {"event": {"const": "sample"}, "data": {"type": "string", "contentMediaType": "application/json"}},
}


def add_ui(
    app: FastAPI,
    gpu_settings: Callable[[], GpuSettings],
    sampler: Sampler,
    table: InstanceTable,
    *,
    read: Responses,
    invalid: Responses,
) -> None:
    """Add the dashboard's routes to ``app``: ``read`` declares the answers of a locked read (401),
    ``invalid`` those of a bad parameter (422)."""
    page = resources.files("launcher") / "ui"
    files = {name: (page / name).read_bytes() for name in _FILES}  # 40 KiB, served from memory
    # Every GPU sample, with the instances on that GPU now, as the event text each open stream is sent
    # (written once, however many pages are open; not at all while none is).
    feed = Bus[str](_QUEUE_SAMPLES)

    def publish(sample: GpuSample) -> None:
        if feed.has_readers:
            feed.publish(_sse(sample.model_copy(update={"instances": table.on_gpu(sample.index)})))

    sampler.subscribe(publish)

    @app.get("/ui", include_in_schema=False)
    async def dashboard() -> Response:
        return _file("index.html", files)

    @app.get("/ui/{name}", include_in_schema=False)
    async def dashboard_file(name: str) -> Response:
        if name not in files:
            raise NotFoundError(f"the dashboard has no file {name}", hint="the page is at /ui")
        return _file(name, files)

    @app.get("/gpus/topology", response_model=GpuTopology, responses=read)
    async def gpu_topology() -> GpuTopology:
        """How the GPUs are joined (each pair once), the thermal limit and how often each GPU is read."""
        links = [
            GpuLink(gpus=pair, link=link.value, direct=link.direct) for pair, link in sorted(sampler.links.items())
        ]
        gpus = gpu_settings()  # those in effect: a reload may change them
        return GpuTopology(links=links, thermal_limit_c=gpus.thermal_limit_c, poll_interval_s=gpus.poll_interval)

    @app.get(
        "/gpus/stream",
        response_class=StreamingResponse,
        responses={
            200: {"content": {"text/event-stream": {"schema": _SAMPLE_EVENT}}, "description": "server-sent events"},
            **read,
            **invalid,
        },
    )
    async def gpu_stream(
        recent: Annotated[int, Query(ge=0, le=100_000)] = 0, follow: bool = False
    ) -> StreamingResponse:
        """Server-sent events, a `sample` (a GpuSample) per GPU reading: the last ``recent`` of each GPU,
        oldest first; with ``follow=true`` then every new one as it is read, for as long as the client
        stays (off by default, as for logs: a client that reads the whole answer gets an end). Live samples name
        the instances on the GPU; past ones name none (as /gpus/{index}/history)."""
        # No await between subscribing and taking the history: no sample is missed or sent twice.
        queue = feed.subscribe() if follow else None
        past = sorted(
            (s for g in sampler.identities for s in sampler.history(g.index)[-recent:] if recent),
            key=lambda s: s.time,
        )

        async def stream() -> AsyncIterator[str]:
            try:
                # The history in one write: sample by sample, a client gone meanwhile would be written to
                # hundreds of times before the loop hears it left (each a warning in the log).
                if past:
                    yield "".join(_sse(sample) for sample in past)
                while queue is not None:
                    yield await queue.get()
            finally:
                if queue is not None:
                    feed.unsubscribe(queue)

        return StreamingResponse(stream(), media_type="text/event-stream")


def _file(name: str, files: dict[str, bytes]) -> Response:
    return Response(files[name], media_type=_FILES[name], headers=_HEADERS)


def _sse(sample: GpuSample) -> str:
    return f"event: sample\ndata: {sample.model_dump_json()}\n\n"
