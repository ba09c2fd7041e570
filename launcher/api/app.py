"""The REST API: health, instances and their acts, plans, GPUs, RPC endpoints, events, logs, the front
door's recent requests and metrics. (The front door itself, /v1 and /upstream, is launcher/route/front.py.)

The API acts on instances through the Manager (start, stop, plans) and on peers' claims through what this
host lends (supervise/lending.py); it reads what the wiring hands it: the instance table, the GPU sampler,
the peers and the event bus.

Every answer, errors included, is a type of launcher.schema, and every path declares each status it can
answer with its body and content type: the OpenAPI document at /openapi.json is the truth (a schemathesis
run over it is part of the tests).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import TypeAdapter

import launcher
from launcher.address import is_loopback
from launcher.api.auth import UNAUTHORISED, ReadAuth, bearer_matches, reads_need_token
from launcher.api.disconnect import unless_gone
from launcher.api.metrics import LauncherCollector, ServerSeriesCollector
from launcher.api.redact import SERVER_WORDS_HIDDEN, redacted_plan, without_log_lines, without_server_words
from launcher.api.ui import add_ui
from launcher.config import Settings
from launcher.errors import LauncherError, NotFoundError
from launcher.events import Bus
from launcher.gpu.sampler import Sampler
from launcher.route.router import Router
from launcher.rpc.peers import Peers
from launcher.schema import (
    ClaimRequest,
    ErrorBody,
    Event,
    GpuSample,
    Health,
    InstanceStatus,
    PeerStatus,
    Plan,
    ReloadReport,
    RequestRecord,
    RollReport,
    RpcClaim,
    RpcReport,
    UpgradeStarted,
)
from launcher.statedir import logs
from launcher.supervise.lending import Lending
from launcher.supervise.manager import Manager
from launcher.supervise.server_metrics import ServerMetrics
from launcher.supervise.table import InstanceTable

Responses = dict[int | str, dict[str, Any]]


def _errors(*statuses: int) -> Responses:
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


def _text(media_type: str, description: str) -> Responses:
    return {200: {"content": {media_type: {"schema": {"type": "string"}}}, "description": description}}


# Each server-sent event: its kind, and an Event (launcher.schema) as JSON.
_SSE_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {"event": {"type": "string"}, "data": {"type": "string", "contentMediaType": "application/json"}},
}


class _Unauthorised(Exception):
    pass


InstanceName = Annotated[str, Path(description="an instance: a configured model, or a replica NAME@N")]
Authorization = Annotated[str | None, Header(description="Bearer <the API token>")]


def create_app(
    settings: Settings,
    *,
    manager: Manager,
    table: InstanceTable,
    sampler: Sampler,
    peer_reader: Peers | None,
    lending: Lending,
    event_bus: Bus[Event],
    router: Router | None = None,
    server_metrics: ServerMetrics | None = None,
    token: str | None = None,
    on_started: Callable[[], Awaitable[None]] | None = None,
    reload: Callable[[bool], Awaitable[ReloadReport]] | None = None,
    upgrade: Callable[[], Awaitable[UpgradeStarted]] | None = None,
    program_started_at: float | None = None,
) -> FastAPI:
    """The REST API. ``router``: the front door's, whose requests `/requests` and `/metrics` report;
    ``server_metrics``: the servers' own series `/metrics` re-exports; ``reload``: the daemon's reload of
    its configuration (given ``dry_run``), for `POST /config/reload`; ``upgrade``: its upgrade in place, for
    `POST /daemon/upgrade`; ``program_started_at``: shown by `/health`."""
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
    read = _errors(401) if reads_locked else {}

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

    async def authorised(authorization: Authorization = None) -> None:
        if token is not None and not bearer_matches(authorization, token):
            raise _Unauthorised()

    def holds_token(authorization: str | None) -> bool:
        """Whether the caller sent the API token: only then are secrets shown (launcher/api/redact.py)."""
        return token is not None and bearer_matches(authorization, token)

    def hides_server_output(authorization: str | None) -> bool:
        """A token is configured and the caller lacks it: no log line, nor a server's words, for it."""
        return token is not None and not holds_token(authorization)

    def shown(status: InstanceStatus, authorization: str | None) -> InstanceStatus:
        if not hides_server_output(authorization):
            return status
        return without_log_lines(status, instances[status.name].server_words)

    @app.exception_handler(_Unauthorised)
    async def unauthorised(_request: Request, _exc: _Unauthorised) -> JSONResponse:
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
        ok = manager.all_ready(manager.autostart_names()) and not manager.lost_servers()
        states = {n: i.state for n, i in instances.items()}
        body = Health(
            status="ok" if ok else "degraded",
            instances=states,
            warnings=manager.health_warnings(),
            program_started_at=program_started_at,
        )
        return JSONResponse(body.model_dump(mode="json"), status_code=200 if ok else 503)

    # The answers are ours, already typed: serialised once, not validated again against the response
    # model on the way out (that halves the cost of a request); the model still describes them.
    statuses_json, samples_json = TypeAdapter(list[InstanceStatus]), TypeAdapter(list[GpuSample])

    @app.get("/instances", response_model=list[InstanceStatus], responses=read)
    async def list_instances(authorization: Authorization = None) -> Response:
        return _json(statuses_json.dump_json([shown(status, authorization) for status in manager.statuses()]))

    @app.get("/instances/{name}", response_model=InstanceStatus, responses={**read, **_errors(404)})
    async def get_instance(name: InstanceName, authorization: Authorization = None) -> Response:
        return _json(shown(manager.status(name), authorization).model_dump_json())

    def action(act: Callable[[str], Awaitable[InstanceStatus]]) -> Callable[[str], Awaitable[InstanceStatus]]:
        async def endpoint(name: InstanceName) -> InstanceStatus:
            return await act(name)

        return endpoint

    acts_refused = _errors(*([401] if token is not None else []), 404, 409, 422, 503)
    for verb, act in (("start", manager.start), ("stop", manager.stop)):
        app.post(
            f"/instances/{{name}}/{verb}",
            status_code=202,
            dependencies=[Depends(authorised)],
            summary=f"{verb.capitalize()} an instance",
            responses=acts_refused,
        )(action(act))

    @app.post(
        "/instances/{name}/restart",
        status_code=202,
        response_model=InstanceStatus | RollReport,
        dependencies=[Depends(authorised)],
        summary="Restart an instance, or roll a model's replicas",
        responses={**acts_refused, 200: {"model": RollReport, "description": "the replicas rolled"}},
    )
    async def restart(name: InstanceName) -> Response:
        """An instance restarts: 202 and its status as the restart began. A model run as replicas (its name)
        restarts them one at a time, each ready again before the next: 200 and how the roll went, rolled or
        where it stopped and why (the replicas after it keep their old server)."""
        done = await manager.restart(name)
        return Response(done.model_dump_json(), 200 if isinstance(done, RollReport) else 202, media_type=_JSON)

    if reload is not None:

        @app.post(
            "/config/reload",
            response_model=ReloadReport,
            dependencies=[Depends(authorised)],
            responses=_errors(*([401] if token is not None else []), 409, 422, 500),
        )
        async def reload_config(dry_run: bool = False) -> Response:
            """Read the configuration file and the environment again as `launcher serve` does and apply the
            difference: per instance kept, restarted, live-updated, stopped, added, updated (changed while
            not running) or failed (its server did not start again: see its reason), and the daemon-level
            keys applied or waiting for a restart. ``dry_run``: only say what would be done. 422 with the
            configuration's error when it does not load: nothing changed. 409 once the daemon is stopping.
            500 when an error struck after the new settings were taken (the event says which)."""
            return _json((await reload(dry_run)).model_dump_json())

    if upgrade is not None:

        @app.post(
            "/daemon/upgrade",
            status_code=202,
            response_model=UpgradeStarted,
            dependencies=[Depends(authorised)],
            responses=_errors(*([401] if token is not None else []), 409),
        )
        async def upgrade_daemon() -> Response:
            """Upgrade the daemon in place (as SIGUSR2 does): the requests in flight finish, then the
            installed program is executed again in the same process and takes over the running servers and
            the listening socket. 409 when it cannot be done now (starting, stopping, already upgrading)."""
            return _json((await upgrade()).model_dump_json(), status_code=202)

    registry = CollectorRegistry(auto_describe=True)
    registry.register(LauncherCollector(manager))
    if router is not None:
        registry.register(router.request_log.metrics)
    if server_metrics is not None:
        registry.register(ServerSeriesCollector(server_metrics))
    records_json = TypeAdapter(list[RequestRecord])

    @app.get("/requests", response_model=list[RequestRecord], responses={**read, **_errors(422)})
    async def requests(recent: Annotated[int, Query(ge=1, le=500)] = 100) -> Response:
        """The front door's most recent requests (/v1, /upstream), oldest first."""
        records = list(router.request_log.records)[-recent:] if router is not None else []
        return _json(records_json.dump_json(records))

    @app.get("/metrics", response_class=Response, responses={**_text(CONTENT_TYPE_LATEST, "Prometheus"), **read})
    async def metrics() -> Response:
        """Prometheus text format: instances (ready, state, restarts, planned VRAM), GPUs, the front door's
        requests and the servers' own series (as last read: a scrape never asks a server)."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/plan/{name}", response_model=Plan, responses={**read, **_errors(404, 422, 503)})
    async def plan(
        name: InstanceName, request: Request, authorization: Authorization = None, estimate: bool = False
    ) -> Response:
        """What `launcher plan NAME` shows: GPUs, MiB per GPU by term, split, command line, environment (the
        configured environment's values and keys in the command line only with the token). ``estimate``:
        from the model's header alone, whatever earlier runs measured (`launcher plan --estimate`)."""
        made = await unless_gone(request, manager.plan(name, estimate))
        shown_plan = made if holds_token(authorization) else redacted_plan(made, instances[name].settings.env)
        return _json(shown_plan.model_dump_json())

    @app.get("/gpus", response_model=list[GpuSample], responses=read)
    async def gpus() -> Response:
        return _json(samples_json.dump_json(manager.gpu_samples()))

    @app.get("/gpus/{index}/history", response_model=list[GpuSample], responses={**read, **_errors(404, 422)})
    async def gpu_history(index: int, limit: Annotated[int, Query(ge=1, le=100_000)] = 600) -> Response:
        if not 0 <= index < len(sampler.identities):
            raise NotFoundError(f"no GPU {index}", hint=f"{len(sampler.identities)} GPUs are seen")
        return _json(samples_json.dump_json(sampler.history(index)[-limit:]))

    @app.get("/rpc", response_model=RpcReport, responses=read)
    async def rpc() -> Response:
        """This host's ready rpc-servers: the endpoint for `llama-server --rpc`, the GPUs each lends with
        their free MiB, who is connected, and the claims peers registered on them."""
        return _json(lending.report().model_dump_json())

    claims_json, peers_json = TypeAdapter(list[RpcClaim]), TypeAdapter(list[PeerStatus])
    acting = _errors(*([401] if token is not None else []), 404, 409, 422)

    @app.post(
        "/rpc/claims",
        response_model=list[RpcClaim],
        dependencies=[Depends(authorised)],
        responses={**acting, **_errors(400)},
    )
    async def claim(request: ClaimRequest) -> Response:
        """Take or renew a peer's claim on one rpc-server's GPUs for ``ttl_s`` seconds (a lease: renew it
        before then); the claims on that endpoint after. 409 when another holds the endpoint (it serves one
        llama-server at a time) or the MiB are not there."""
        return _json(claims_json.dump_json(lending.claim(request)))

    @app.delete("/rpc/claims/{holder:path}", status_code=204, dependencies=[Depends(authorised)], responses=acting)
    async def release(holder: Annotated[str, Path(description="the holder the claim was taken for")]) -> Response:
        """Release ``holder``'s claim (already gone is fine: it may have lapsed)."""
        lending.release(holder)
        return Response(status_code=204)

    @app.get("/peers", response_model=list[PeerStatus], responses=read)
    async def peers() -> Response:
        """What this daemon last read of each peer's `GET /rpc`, and whether it answers."""
        statuses = peer_reader.statuses() if peer_reader is not None else []
        return _json(peers_json.dump_json(statuses))

    @app.get(
        "/events",
        response_class=StreamingResponse,
        responses={
            200: {"content": {"text/event-stream": {"schema": _SSE_EVENT}}, "description": "server-sent events"},
            **read,
            **_errors(422),
        },
    )
    async def events(
        recent: Annotated[int, Query(ge=0, le=500)] = 0, follow: bool = True, authorization: Authorization = None
    ) -> StreamingResponse:
        """Server-sent events: state changes, exits, errors, thermal warnings; ``recent`` past ones first.
        With ``follow=false`` the stream ends after those (a script's look at what just happened)."""
        queue = event_bus.subscribe() if follow else None
        past = event_bus.recent(recent)
        hide_server_words = hides_server_output(authorization)

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
    @app.get(
        "/instances/{name}/logs",
        response_class=StreamingResponse,  # no media type of its own: the error bodies are documented as JSON
        dependencies=[Depends(authorised)],
        responses={**_text("text/plain", "the server's log"), **read, **_errors(*([401] if token else []), 404, 422)},
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

    add_ui(app, lambda: manager.settings.gpus, sampler, table, read=read, invalid=_errors(422))
    return app


_JSON = "application/json"


def _json(body: str | bytes, status_code: int = 200) -> Response:
    return Response(body, status_code=status_code, media_type=_JSON)


def _sse(event: Event) -> str:
    return f"event: {event.kind}\ndata: {event.model_dump_json()}\n\n"
