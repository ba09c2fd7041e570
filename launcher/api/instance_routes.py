"""The API's instances: their statuses (without what the servers said, for a caller without the token) and
the acts on them: start, stop, restart (a model's replicas roll), refused while the daemon says why not (an
upgrade under way: its exec would cut an act part-way)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from pydantic import TypeAdapter

from launcher.api.access import Access
from launcher.api.answers import JSON, Authorization, InstanceName, errors, json_answer
from launcher.api.redact import without_log_lines
from launcher.errors import ConflictError
from launcher.schema_instances import InstanceStatus
from launcher.schema_reload import RollReport
from launcher.supervise.manager import Manager
from launcher.supervise.table import InstanceView


def instance_routes(
    manager: Manager,
    instances: Mapping[str, InstanceView],
    access: Access,
    acts_refused: Callable[[], str | None],
) -> APIRouter:
    """``acts_refused``: why the daemon takes no act on an instance now, or None."""
    routes = APIRouter()
    statuses_json = TypeAdapter(list[InstanceStatus])

    def shown(status: InstanceStatus, authorization: str | None) -> InstanceStatus:
        if not access.hides_server_output(authorization):
            return status
        return without_log_lines(status, instances[status.name].server_words)

    @routes.get("/instances", response_model=list[InstanceStatus], responses=access.read)
    async def list_instances(authorization: Authorization = None) -> Response:
        return json_answer(statuses_json.dump_json([shown(status, authorization) for status in manager.statuses()]))

    @routes.get("/instances/{name}", response_model=InstanceStatus, responses={**access.read, **errors(404)})
    async def get_instance(name: InstanceName, authorization: Authorization = None) -> Response:
        return json_answer(shown(manager.status(name), authorization).model_dump_json())

    def action(act: Callable[[str], Awaitable[InstanceStatus]]) -> Callable[[str], Awaitable[InstanceStatus]]:
        async def endpoint(name: InstanceName) -> InstanceStatus:
            return await act(name)

        return endpoint

    async def taken() -> None:
        """A route dependency, after the token's: the daemon takes acts now."""
        why = acts_refused()
        if why is not None:
            raise ConflictError(f"the daemon takes no act on an instance now: {why}", hint="ask again once it is over")

    acting = [Depends(access.authorised), Depends(taken)]
    refused = access.refused(404, 409, 422, 503)
    for verb, act in (("start", manager.start), ("stop", manager.stop)):
        routes.post(
            f"/instances/{{name}}/{verb}",
            status_code=202,
            dependencies=acting,
            summary=f"{verb.capitalize()} an instance",
            responses=refused,
        )(action(act))

    @routes.post(
        "/instances/{name}/restart",
        status_code=202,
        response_model=InstanceStatus | RollReport,
        dependencies=acting,
        summary="Restart an instance, or roll a model's replicas",
        responses={**refused, 200: {"model": RollReport, "description": "the replicas rolled"}},
    )
    async def restart(name: InstanceName) -> Response:
        """An instance restarts: 202 and its status as the restart began. A model run as replicas (its name)
        restarts them one at a time, each ready again before the next: 200 and how the roll went, rolled or
        where it stopped and why (the replicas after it keep their old server)."""
        done = await manager.restart(name)
        return Response(done.model_dump_json(), 200 if isinstance(done, RollReport) else 202, media_type=JSON)

    return routes
