"""Reloading the configuration while the daemon runs (`POST /config/reload`, `launcher reload`, SIGHUP):
read the file and the environment again as `launcher serve` does, plan the difference
(launcher/config_change.py) and have the parts that hold settings take the new ones: the manager (its
instances), then the front door's router, then the manager's acts (stops, restarts, starts).

A configuration that does not load, names a missing model file or asks for more replicas than there are
GPUs changes nothing: the reload answers with the one-sentence error `serve` would give, and an event
records it. Reloads run one at a time, and none once the daemon has begun to stop (`close`): a reload's
restarts would start servers the stop then cuts, and run the stop past its budget.

The answer, and the event, say what came of each change once it was carried out: a changed model whose
server did not come back is `failed`, with the reason (the dry run says what would be done).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from launcher.backends import backend_for
from launcher.backends.options import check_server_args
from launcher.config import Settings
from launcher.config_change import in_effect, plan_reload
from launcher.config_file import load_settings
from launcher.errors import ConflictError, LauncherError
from launcher.schema_instances import Event
from launcher.schema_reload import Change, ReloadReport
from launcher.wiring import Wired


def read_like_serve(source: Path | None) -> Settings:
    """The configuration as `launcher serve` reads it: the file (and the environment), its servers' args."""
    settings = load_settings(source)
    check_server_args(settings)
    return settings


class Reloader:
    """Reloads the configuration of the daemon wired in ``wired``, which runs with ``settings``; ``autostart``:
    whether added autostart models start (not in a daemon started without, `serve --no-autostart`, `up`)."""

    def __init__(self, settings: Settings, wired: Wired, *, autostart: bool = True) -> None:
        self._settings = settings
        self._wired = wired
        self._autostart = autostart
        self._lock = asyncio.Lock()
        self._listeners: list[Callable[[Settings], None]] = []
        self._closed: str | None = None  # why reloads are refused (the daemon is stopping, or upgrading)

    def close(self, reason: str) -> None:
        """Refuse every reload from now on, with ``reason``: those asked for, those waiting for the one
        under way, and one whose file is being read (it applies nothing)."""
        self._closed = reason

    def reopen(self) -> None:
        """Take reloads again: the upgrade that refused them failed, and the daemon serves on as it was."""
        self._closed = None

    def _refuse_if_closed(self) -> None:
        if self._closed is not None:
            raise ConflictError(f"the configuration is not reloaded: {self._closed}")

    @property
    def reloading(self) -> bool:
        """Whether a reload is under way (reading the file or carrying out its acts)."""
        return self._lock.locked()

    def subscribe(self, listener: Callable[[Settings], None]) -> None:
        """Call ``listener`` with the settings in effect after each reload (a part built outside the wiring:
        the front door takes its keys)."""
        self._listeners.append(listener)

    async def reload(self, *, dry_run: bool = False) -> ReloadReport:
        """What the reload did (or, ``dry_run``, would do); raises the configuration's error, changing nothing."""
        self._refuse_if_closed()
        async with self._lock:
            self._refuse_if_closed()
            try:
                new = await asyncio.to_thread(read_like_serve, self._settings.source)
                gpus = [gpu.index for gpu in self._wired.sampler.identities]
                report = plan_reload(self._settings, new, gpus, dry_run=dry_run)
                self._check_model_files(new, report)
            except LauncherError as exc:
                self._publish("error", f"the configuration was not reloaded: {exc.message}")
                raise
            except Exception as exc:  # a bug or a file nobody foresaw: nothing changed, and the caller hears why
                message = f"the configuration was not reloaded: unexpected error: {type(exc).__name__}: {exc}"
                self._publish("error", message)
                raise LauncherError(message) from exc
            if dry_run:
                return report
            self._refuse_if_closed()  # the daemon began to stop while the file was read
            try:
                return await self._apply(in_effect(self._settings, new, report), report)
            except LauncherError as exc:
                self._publish("error", f"the configuration was reloaded in part: {exc.message}")
                raise
            except Exception as exc:  # a bug: the caller hears it in the API's error shape, not as a bare 500
                message = f"the configuration was reloaded in part: unexpected error: {type(exc).__name__}: {exc}"
                self._publish("error", message)
                raise LauncherError(message) from exc

    async def _apply(self, settings: Settings, report: ReloadReport) -> ReloadReport:
        """Have the parts take ``settings`` and carry out ``report``'s acts; what came of each."""
        self._wired.manager.reconfigure(settings, report)
        self._wired.router.reconfigure(settings)
        for listener in self._listeners:
            listener(settings)
        self._settings = settings
        outcomes = await self._wired.manager.carry_out(report, autostart=self._autostart)
        done = report.model_copy(update={"instances": outcomes})
        self._publish("reload", done.describe())
        return done

    def _publish(self, kind: str, message: str) -> None:
        self._wired.events.publish(Event.now(kind, message))

    def _check_model_files(self, settings: Settings, report: ReloadReport) -> None:
        """The model file of each instance the reload starts (an added autostart one, a changed one that
        runs) is there (ModelFileError, a ConfigError, if not): a running server is never stopped for a
        file that is not there."""
        running = self._wired.table.view
        for change in report.instances:
            if change.change not in (Change.ADDED, Change.RESTARTED):
                continue
            model = settings.models[change.model]
            if (model.autostart and self._autostart) if change.change == Change.ADDED else running[change.name].active:
                backend_for(model, settings.rpc).check_model(model, change.name)
