"""The API's reports: the front door's recent requests and the Prometheus metrics (the instances, the GPUs,
the front door's requests and the servers' own series)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import TypeAdapter

from launcher.api.access import Access
from launcher.api.answers import errors, json_answer, text
from launcher.api.metrics import LauncherCollector, ServerSeriesCollector
from launcher.route.router import Router
from launcher.schema_front_door import RequestRecord
from launcher.supervise.manager import Manager
from launcher.supervise.server_metrics import ServerMetrics


def report_routes(
    manager: Manager, router: Router | None, server_metrics: ServerMetrics | None, access: Access
) -> APIRouter:
    """``router``: the front door's, whose requests `/requests` and `/metrics` report; ``server_metrics``:
    the servers' own series `/metrics` re-exports."""
    routes = APIRouter()
    registry = CollectorRegistry(auto_describe=True)
    registry.register(LauncherCollector(manager))
    if router is not None:
        registry.register(router.request_log.metrics)
    if server_metrics is not None:
        registry.register(ServerSeriesCollector(server_metrics))
    records_json = TypeAdapter(list[RequestRecord])

    @routes.get("/requests", response_model=list[RequestRecord], responses={**access.read, **errors(422)})
    async def requests(recent: Annotated[int, Query(ge=1, le=500)] = 100) -> Response:
        """The front door's most recent requests (/v1, /upstream), oldest first."""
        records = list(router.request_log.records)[-recent:] if router is not None else []
        return json_answer(records_json.dump_json(records))

    @routes.get(
        "/metrics", response_class=Response, responses={**text(CONTENT_TYPE_LATEST, "Prometheus"), **access.read}
    )
    async def metrics() -> Response:
        """Prometheus text format: instances (ready, state, restarts, planned VRAM), GPUs, the front door's
        requests and the servers' own series (as last read: a scrape never asks a server)."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return routes
