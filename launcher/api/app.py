"""The REST API: health, instances and their acts, plans, GPUs, RPC endpoints, events, logs, the front
door's recent requests and metrics. (The front door itself, /v1 and /upstream, is launcher/route/front.py.)

The API acts on instances through the Manager (start, stop, plans) and on peers' claims through what this
host lends (supervise/lending.py); it reads what the wiring hands it (`ApiParts`): the instance table, the
GPU sampler, the peers, the event bus, the front door's router and the servers' metrics.

Every answer, errors included, is a wire type (launcher/schema*.py), and every path declares each status it can
answer with its body and content type: the OpenAPI document at /openapi.json is the truth (a schemathesis
run over it is part of the tests).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

import launcher
from launcher.address import is_loopback
from launcher.api.access import Access, Unauthorised
from launcher.api.answers import Responses, errors
from launcher.api.auth import UNAUTHORISED, ReadAuth, reads_need_token
from launcher.api.daemon_routes import daemon_routes
from launcher.api.instance_routes import instance_routes
from launcher.api.machine_routes import machine_routes
from launcher.api.report_routes import report_routes
from launcher.api.stream_routes import stream_routes
from launcher.api.ui import add_ui
from launcher.config import Settings
from launcher.errors import LauncherError
from launcher.events import Bus
from launcher.gpu.sampler import Sampler
from launcher.route.router import Router
from launcher.rpc.peers import Peers
from launcher.schema import ErrorBody
from launcher.schema_instances import Event, Health
from launcher.schema_reload import ReloadReport, UpgradeStarted
from launcher.supervise.health import all_ready, health_warnings, lost_servers
from launcher.supervise.lending import Lending
from launcher.supervise.manager import Manager
from launcher.supervise.server_metrics import ServerMetrics
from launcher.supervise.table import InstanceTable


class ApiParts(Protocol):
    """What the API reads and acts through (launcher/wiring.py's `Wired` is one)."""

    @property
    def manager(self) -> Manager: ...
    @property
    def table(self) -> InstanceTable: ...
    @property
    def sampler(self) -> Sampler: ...
    @property
    def peers(self) -> Peers | None: ...
    @property
    def lending(self) -> Lending: ...
    @property
    def events(self) -> Bus[Event]: ...
    @property
    def router(self) -> Router: ...  # the front door's, whose requests `/requests` and `/metrics` report
    @property
    def server_metrics(self) -> ServerMetrics: ...  # the servers' own series `/metrics` re-exports


def create_app(
    settings: Settings,
    parts: ApiParts,
    *,
    token: str | None = None,
    on_started: Callable[[], Awaitable[None]] | None = None,
    reload: Callable[[bool], Awaitable[ReloadReport]] | None = None,
    upgrade: Callable[[], Awaitable[UpgradeStarted]] | None = None,
    program_started_at: float | None = None,
    acts_refused: Callable[[], str | None] = lambda: None,
) -> FastAPI:
    """The REST API over ``parts``: the paths of each group (launcher/api/*_routes.py), the errors as
    ErrorBody, the token's rules. ``reload``: the daemon's reload of
    its configuration (given ``dry_run``), for `POST /config/reload`; ``upgrade``: its upgrade in place, for
    `POST /daemon/upgrade`; ``program_started_at``: shown by `/health`; ``acts_refused``: why the daemon
    takes no act on an instance now (an upgrade under way), or None: the acts answer 409 with it."""
    manager, table, router = parts.manager, parts.table, parts.router
    instances = table.view

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if on_started is not None:
            await on_started()
        yield

    # Every path answers these before anything else (launcher/api/origin.py, in front of the app).
    refused: Responses = {
        403: {"model": ErrorBody, "description": "sent by a page of another origin or site (Origin, Sec-Fetch-Site)"},
        421: {"model": ErrorBody, "description": "the Host is not one of the daemon's names (daemon.allowed_hosts)"},
    }
    app = FastAPI(title="launcher", version=launcher.__version__, lifespan=lifespan, responses=refused)
    reads_locked = token is not None and reads_need_token(settings.daemon.auth_reads, is_loopback(settings.daemon.host))
    if reads_locked and token is not None:
        app.add_middleware(ReadAuth, token=token)
    access = Access(token, reads_locked=reads_locked)

    @app.exception_handler(LauncherError)
    async def launcher_error(_request: Request, exc: LauncherError) -> JSONResponse:
        return JSONResponse(ErrorBody(detail=exc.message, hint=exc.hint).model_dump(), status_code=exc.http_status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].replace('Input should be', 'should be')}"
            for e in exc.errors()
        )
        return JSONResponse(ErrorBody(detail=problems).model_dump(), status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        # A defect of ours: the client gets an answer in the API's shape, not Starlette's plain text; the
        # traceback goes to the daemon's log (Starlette raises the exception again once this is sent).
        detail = f"the daemon failed on this request: {type(exc).__name__}"
        return JSONResponse(ErrorBody(detail=detail, hint="see the daemon's log").model_dump(), status_code=500)

    @app.exception_handler(Unauthorised)
    async def unauthorised(_request: Request, _exc: Unauthorised) -> JSONResponse:
        return JSONResponse(UNAUTHORISED.model_dump(), status_code=401, headers={"WWW-Authenticate": "Bearer"})

    @app.get(
        "/health",
        response_model=Health,
        responses={503: {"model": Health, "description": "an instance is not ready, or lost its server"}},
    )
    async def health() -> JSONResponse:
        """200 when every autostart instance is ready with a live server process and no instance claims a
        server that is gone, 503 otherwise; the state of every instance, and warnings (a lost server, a
        state directory that cannot be written: that one alone keeps 200, the servers run on)."""
        ok = all_ready(manager.instances, manager.autostart_names()) and not lost_servers(manager.instances)
        states = {n: i.state for n, i in instances.items()}
        body = Health(
            status="ok" if ok else "degraded",
            instances=states,
            warnings=health_warnings(manager.instances, manager.writes.warning),
            program_started_at=program_started_at,
        )
        return JSONResponse(body.model_dump(mode="json"), status_code=200 if ok else 503)

    # In this order: the OpenAPI document lists the paths as they are added.
    app.include_router(instance_routes(manager, instances, access, acts_refused))
    app.include_router(daemon_routes(access, reload, upgrade))
    app.include_router(report_routes(manager, router, parts.server_metrics, access))
    app.include_router(machine_routes(manager, instances, parts.sampler, parts.lending, parts.peers, access))
    app.include_router(stream_routes(manager, instances, parts.events, access))
    add_ui(app, lambda: manager.settings.gpus, parts.sampler, table, read=access.read, invalid=errors(422))
    return app
