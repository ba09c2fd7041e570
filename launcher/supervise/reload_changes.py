"""What a reload changes on the instances, once the manager has taken its settings (config_change.py says
what changed; launcher/reloading.py runs a reload): added instances join the table and start, live keys
apply, removed instances are stopped and forgotten, changed ones restart with their new settings, a model's
replicas rolling one at a time (supervise/rolling.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping

from launcher.config_model import ModelSettings
from launcher.errors import ConflictError, LauncherError
from launcher.schema_instances import InstanceStatus, State
from launcher.schema_reload import Change, InstanceChange, ReloadReport, RollReport
from launcher.supervise.instance import Instance
from launcher.supervise.table import InstanceTable

# A server started and not yet ready, nor ended.
_ON_ITS_WAY = frozenset({State.STARTING, State.LOADING})


def take_changes(
    table: InstanceTable,
    report: ReloadReport,
    after: Mapping[str, tuple[str, ModelSettings]],
    make: Callable[[str, str, ModelSettings], Instance],
) -> None:
    """The table's side of a reload's settings, at once: added instances (``make``: one, by name, group and
    settings) join it, stopped; live keys apply; removed instances leave their model (the front door no
    longer sees them) but stay in the table until `ReloadChanges.carry_out` has stopped them. ``after``:
    the configured instances, each with its group and settings."""
    for change in report.instances:
        if change.change == Change.ADDED:
            table.add(make(change.name, *after[change.name]))
        elif change.change == Change.LIVE_UPDATED:
            instance = table.instances[change.name]
            instance.reconfigure(after[change.name][1], instance.backend)
        elif change.change == Change.STOPPED:
            table.ungroup(change.name)


class ReloadChanges:
    """The acts of a reload, with the manager's own acts, handed over when it is built."""

    def __init__(
        self,
        instances: Mapping[str, Instance],
        *,
        stop: Callable[[str], Awaitable[InstanceStatus]],
        start_or_refuse: Callable[[str], Awaitable[str | None]],
        roll: Callable[[str, list[str], Callable[[Instance], Awaitable[None]]], Awaitable[RollReport]],
        take_configured: Callable[[Instance], Awaitable[None]],
        forget: Callable[[str], None],
    ) -> None:
        """``instances``: the manager's, as they come and go; ``start_or_refuse``: a start whose failure marks
        its instance failed (why, or None); ``roll``: a model's rolling restart of these of its replicas by
        this act; ``take_configured``: the instance restarted with its settings configured now (given them
        alone if it does not run); ``forget``: a removed instance, stopped, leaves the table."""
        self._instances = instances
        self._stop = stop
        self._start_or_refuse = start_or_refuse
        self._roll = roll
        self._take_configured = take_configured
        self._forget = forget

    async def carry_out(self, report: ReloadReport, *, autostart: bool = True) -> list[InstanceChange]:
        """The acts of a reload, after the manager's `reconfigure`, and what came of each change of ``report``: removed
        instances stopped and forgotten and changed ones restarted with their new settings (those that ran;
        one that did not is `updated`), together, a model's replicas rolling one at a time
        (supervise/rolling.py); then added autostart ones started (unless not ``autostart``: a daemon
        started without). A start that fails marks its instance failed, as at the daemon's start, and its
        change `failed` with the reason."""
        changes = report.instances
        restarted: dict[str, list[InstanceChange]] = {}  # configured model -> its changed instances
        for change in changes:
            if change.change == Change.RESTARTED:
                restarted.setdefault(change.model, []).append(change)
        removed, rolled = await asyncio.gather(
            asyncio.gather(*(self._remove(c) for c in changes if c.change == Change.STOPPED)),
            asyncio.gather(*(self._restart_changed(model, changed) for model, changed in restarted.items())),
        )
        outcomes = {outcome.name: outcome for outcome in [*removed, *(o for model in rolled for o in model)]}
        for change in changes:
            if autostart and change.change == Change.ADDED and self._instances[change.name].settings.autostart:
                failure = await self._start_or_refuse(change.name)
                outcomes[change.name] = await self._came_up(change) if failure is None else _failed(change, failure)
        return [outcomes.get(change.name, change) for change in changes]

    async def _came_up(self, change: InstanceChange) -> InstanceChange:
        """``change``, once the server it started is ready; `failed` with the reason when it ended first (or
        is still not ready after twice its load timeout: a wait for memory included)."""
        instance = self._instances[change.name]
        timeout_s = 2 * instance.settings.health.load_timeout
        try:
            await instance.wait_until(lambda i: i.state not in _ON_ITS_WAY, timeout_s)
        except TimeoutError:
            return _failed(change, f"not ready within {timeout_s:g}s ({instance.state.value})")
        if instance.state == State.READY:
            return change
        return _failed(change, f"{instance.state.value}: {instance.last_error or 'its server ended'}")

    async def _remove(self, change: InstanceChange) -> InstanceChange:
        """A removed instance: retired first, so that a start waiting on its lock during the stop's drain
        is refused, never spawning a server outside the table; stopped, then forgotten."""
        name = change.name
        self._instances[name].retire(f"{name} was removed from the configuration")
        with contextlib.suppress(ConflictError):  # not running
            await self._stop(name)
        self._forget(name)
        return change

    async def _restart_changed(self, model: str, changed: list[InstanceChange]) -> list[InstanceChange]:
        """The changed instances of configured ``model``: several replicas roll, one at a time; what came of
        each (a replica after the one that stopped the roll was not restarted: it keeps its old server)."""
        ran = {c.name: self._instances[c.name].active for c in changed}
        if len(changed) == 1:
            try:
                await self._restart_with(self._instances[changed[0].name])
            except LauncherError as exc:
                return [_failed(changed[0], exc.message)]
            return [await self._came_up(changed[0]) if ran[changed[0].name] else _updated(changed[0])]
        roll = await self._roll(model, [c.name for c in changed], self._restart_with)
        for name in roll.left_out:  # stopped by hand meanwhile: its next start takes the new settings
            if name in self._instances and not self._instances[name].active:
                with contextlib.suppress(LauncherError):  # the instance shows it
                    await self._restart_with(self._instances[name])

        def outcome(change: InstanceChange) -> InstanceChange:
            if change.name in roll.restarted:
                return change if ran[change.name] else _updated(change)
            if change.name in roll.left_out:
                return _updated(change)
            if change.name == roll.stopped_at:
                return _failed(change, roll.reason or "it did not come back")
            return _failed(change, f"not restarted: the rolling restart stopped at {roll.stopped_at}")

        return [outcome(c) for c in changed]

    async def _restart_with(self, instance: Instance) -> None:
        """A changed instance: restarted with its settings configured now if it ran, given them alone if not.
        One that cannot start again is marked failed, as at the daemon's start, and raises why (a roll stops
        there: the replicas after it keep their server)."""
        try:
            await self._take_configured(instance)
        except LauncherError as exc:
            instance.refuse(exc)
            raise
        except Exception as exc:  # a bug or a file nobody foresaw: that model fails, the daemon serves on
            error = LauncherError(f"unexpected error: {type(exc).__name__}: {exc}")
            instance.refuse(error)
            raise error from exc


def _failed(change: InstanceChange, reason: str) -> InstanceChange:
    return change.model_copy(update={"change": Change.FAILED, "reason": reason})


def _updated(change: InstanceChange) -> InstanceChange:
    return change.model_copy(update={"change": Change.UPDATED})
