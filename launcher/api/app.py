"""FastAPI application: health, instances, start/stop/restart, logs."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

import launcher
from launcher.api.metrics import LauncherCollector
from launcher.errors import LauncherError, NotFoundError
from launcher.gpu.types import GpuSample
from launcher.plan.planner import Plan
from launcher.supervise import logs
from launcher.supervise.instance import Event, InstanceStatus
from launcher.supervise.manager import Manager


def create_app(
    manager: Manager,
    *,
    token: str | None = None,
    autostart: bool = True,
    on_started: Callable[[], None] = lambda: None,
    on_stopping: Callable[[], None] = lambda: None,
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await manager.open()
        if autostart:
            await manager.autostart()
        on_started()
        try:
            yield
        finally:
            on_stopping()
            await manager.shutdown()

    app = FastAPI(title="launcher", version=launcher.__version__, lifespan=lifespan)

    @app.exception_handler(LauncherError)
    async def launcher_error(_request: Request, exc: LauncherError) -> JSONResponse:
        return JSONResponse({"detail": exc.message, "hint": exc.hint}, status_code=exc.http_status)

    async def authorised(authorization: Annotated[str | None, Header()] = None) -> None:
        if token is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), token.encode()):
            raise _Unauthorised()

    @app.exception_handler(_Unauthorised)
    async def unauthorised(_request: Request, _exc: _Unauthorised) -> JSONResponse:
        return JSONResponse(
            {"detail": "this action needs Authorization: Bearer <token>", "hint": "see daemon.token_file"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    @app.get("/health")
    async def health() -> JSONResponse:
        names = manager.autostart_names()
        ok = manager.all_ready(names)
        body = {
            "status": "ok" if ok else "degraded",
            "instances": {name: i.state.value for name, i in manager.instances.items()},
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/instances")
    async def list_instances() -> list[InstanceStatus]:
        return manager.statuses()

    @app.get("/instances/{name}")
    async def get_instance(name: str) -> InstanceStatus:
        return manager.get(name).status(events=50)

    def action(act: Callable[[str], Awaitable[InstanceStatus]]) -> Callable[[str], Awaitable[InstanceStatus]]:
        async def endpoint(name: str) -> InstanceStatus:
            return await act(name)

        return endpoint

    for verb, act in (("start", manager.start), ("stop", manager.stop), ("restart", manager.restart)):
        app.post(
            f"/instances/{{name}}/{verb}",
            status_code=202,
            dependencies=[Depends(authorised)],
            summary=f"{verb.capitalize()} an instance",
        )(action(act))

    registry = CollectorRegistry(auto_describe=True)
    registry.register(LauncherCollector(manager))

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format: instances (ready, state, restarts, planned VRAM) and GPUs."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/plan/{name}")
    async def plan(name: str) -> Plan:
        """What `launcher plan NAME` shows: GPUs, MiB per GPU by term, split, command line, environment."""
        return manager.plan(name)

    @app.get("/gpus")
    async def gpus() -> list[GpuSample]:
        return manager.gpu_samples()

    @app.get("/gpus/{index}/history")
    async def gpu_history(index: int, limit: Annotated[int, Query(ge=1, le=100_000)] = 600) -> list[GpuSample]:
        if not 0 <= index < len(manager.sampler.identities):
            raise NotFoundError(f"no GPU {index}", hint=f"{len(manager.sampler.identities)} GPUs are seen")
        return manager.sampler.history(index)[-limit:]

    @app.get("/events")
    async def events(recent: Annotated[int, Query(ge=0, le=500)] = 0) -> StreamingResponse:
        """Server-sent events: state changes, exits, errors, thermal warnings (``recent`` past ones first)."""
        queue = manager.subscribe()
        past = list(manager.events)[-recent:] if recent else []

        async def stream() -> AsyncIterator[str]:
            try:
                for event in past:
                    yield _sse(event)
                while True:
                    yield _sse(await queue.get())
            finally:
                manager.unsubscribe(queue)

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/instances/{name}/logs")
    async def instance_logs(
        name: str, tail: Annotated[int, Query(ge=0, le=100_000)] = 100, follow: bool = False
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

    return app


class _Unauthorised(Exception):
    pass


def _sse(event: Event) -> str:
    return f"event: {event.kind}\ndata: {event.model_dump_json()}\n\n"
