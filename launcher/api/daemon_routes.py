"""The API's acts on the daemon itself: reloading its configuration and upgrading it in place (each only
where the daemon gives the app a way to)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from launcher.api.access import Access
from launcher.api.answers import json_answer
from launcher.schema_reload import ReloadReport, UpgradeStarted


def daemon_routes(
    access: Access,
    reload: Callable[[bool], Awaitable[ReloadReport]] | None,
    upgrade: Callable[[], Awaitable[UpgradeStarted]] | None,
) -> APIRouter:
    """``reload``: the daemon's reload of its configuration (given ``dry_run``), for `POST /config/reload`;
    ``upgrade``: its upgrade in place, for `POST /daemon/upgrade`."""
    routes = APIRouter()
    if reload is not None:

        @routes.post(
            "/config/reload",
            response_model=ReloadReport,
            dependencies=[Depends(access.authorised)],
            responses=access.refused(409, 422, 500),
        )
        async def reload_config(dry_run: bool = False) -> Response:
            """Read the configuration file and the environment again as `launcher serve` does and apply the
            difference: per instance kept, restarted, live-updated, stopped, added, updated (changed while
            not running) or failed (its server did not start again: see its reason), and the daemon-level
            keys applied or waiting for a restart. ``dry_run``: only say what would be done. 422 with the
            configuration's error when it does not load: nothing changed. 409 once the daemon is stopping.
            500 when an error struck after the new settings were taken (the event says which)."""
            return json_answer((await reload(dry_run)).model_dump_json())

    if upgrade is not None:

        @routes.post(
            "/daemon/upgrade",
            status_code=202,
            response_model=UpgradeStarted,
            dependencies=[Depends(access.authorised)],
            responses=access.refused(409),
        )
        async def upgrade_daemon() -> Response:
            """Upgrade the daemon in place (as SIGUSR2 does): the requests in flight finish, then the
            installed program is executed again in the same process and takes over the running servers and
            the listening socket. 409 when it cannot be done now (starting, stopping, already upgrading)."""
            return json_answer((await upgrade()).model_dump_json(), status_code=202)

    return routes
