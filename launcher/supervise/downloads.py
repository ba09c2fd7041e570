"""The download of a hub model's files before its start (the manager's start of a model not in the cache):
planned first from the files' headers, so a model that does not fit is refused before a byte of weights;
then pulled in a worker thread (launcher/hub/fetching.py), its progress shown on the instance, a stop
cancelling it at its next chunk with the partial file kept; then the start."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

from launcher.backends.base import hub_files_cached
from launcher.config_hub import HubSettings
from launcher.config_model import ModelSettings
from launcher.errors import ConflictError, LauncherError, StartError
from launcher.hub.cache import cache_dir
from launcher.hub.fetching import pull_planned
from launcher.schema_instances import Download
from launcher.schema_plans import HubPlan, Plan
from launcher.supervise.instance import Instance


async def begin_download(
    instance: Instance,
    plan: Callable[[], Awaitable[Plan]],
    hub_settings: HubSettings,
    headers_dir: Path,
    then_start: Callable[[], None],
) -> bool:
    """When ``instance``'s hub files are not in the cache: its ``plan`` (from their headers) must fit, then
    they download in the background and ``then_start`` runs at the end; True then. False: they are there."""
    if instance.downloading:
        raise ConflictError(f"{instance.name} is already downloading")
    instance.refuse_if_retired()  # the daemon stops, or a reload removed it: nothing is fetched for it
    if instance.active or await asyncio.to_thread(hub_files_cached, instance.settings):
        return False
    planned = await planned_to_fit(instance, plan, lambda p: p.hub is not None)
    hub = planned.hub
    assert hub is not None  # checked by planned_to_fit
    instance.refuse_if_retired()  # meanwhile: its stop found no download to end, and none would end this one
    if instance.downloading or instance.active:  # started meanwhile (by the front door while this planned)
        raise ConflictError(f"{instance.name} is already {instance.state}")
    task = asyncio.create_task(
        _download(instance, hub, instance.settings, hub_settings, headers_dir), name=f"download:{instance.name}"
    )
    task.add_done_callback(lambda done: None if done.cancelled() or done.exception() else then_start())
    files = f"{len(hub.files)} files" if len(hub.files) > 1 else hub.files[0]
    instance.begin_download(task, f"{hub.repo} at {hub.commit[:12]}: {files}, {hub.size_bytes} bytes")
    return True


async def planned_to_fit(
    instance: Instance, plan: Callable[[], Awaitable[Plan]], usable: Callable[[Plan], bool] = lambda _: True
) -> Plan:
    """``instance``'s ``plan`` before a download, which must fit (and be ``usable``): otherwise the refusal
    is recorded on the instance and raised."""
    try:
        planned = await plan()
    except LauncherError as exc:
        instance.record_refusal(exc)
        raise
    if not planned.fits or not usable(planned):
        refusal = StartError(
            planned.reason or f"{instance.name} does not fit", hint="; ".join(planned.suggestions) or None
        )
        instance.record_refusal(refusal)
        raise refusal
    return planned


async def _download(
    instance: Instance, hub: HubPlan, model: ModelSettings, settings: HubSettings, headers_dir: Path
) -> None:
    """The files of ``hub`` pulled in a worker thread, progress to the instance. A cancel (a stop) tells the
    thread, which ends at its next chunk, its partial file kept."""
    loop = asyncio.get_running_loop()
    cancelled = threading.Event()

    def progress(download: Download) -> None:
        loop.call_soon_threadsafe(instance.download_progress, download)

    pull = functools.partial(pull_planned, hub, model, settings, headers_dir, cache_dir(), progress, cancelled)
    try:
        await asyncio.shield(loop.run_in_executor(None, pull))
    except asyncio.CancelledError:
        cancelled.set()
        raise
