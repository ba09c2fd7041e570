"""The plan of a server just ready against what it says it allocated, read once from its load log (never
delaying its ready): what it measured filed for the next plan of the same model, then the check shown and
its findings told."""

from __future__ import annotations

import asyncio
from pathlib import Path

from launcher.backends import LaunchSpec, ServerBackend
from launcher.config_model import ModelSettings
from launcher.plan import verdict
from launcher.plan.measured import with_process_mib
from launcher.schema_plans import Plan, PlanCheck
from launcher.statedir import logs
from launcher.supervise.parts import DaemonParts
from launcher.supervise.record import InstanceRecord

# Of a server just ready: where its load log (what it allocated per device) is looked for. A -lv 4 load
# of a large model writes a few hundred lines; the start marker bounds it first.
_LOAD_LINES_READ = 5000


class PlanChecker:
    def __init__(self, group: str, log_path: Path, parts: DaemonParts, record: InstanceRecord) -> None:
        self._group = group
        self._log_path = log_path
        self._parts = parts
        self._record = record
        # The plan of the running server against what it reports allocating: read once it is ready.
        self.actual: PlanCheck | None = None
        self.actual_missing: str | None = None

    def forget(self) -> None:
        """A new server starts: the last one's check no longer holds."""
        self.actual, self.actual_missing = None, None

    async def check(
        self, plan: Plan | None, backend: ServerBackend, settings: ModelSettings, spec: LaunchSpec | None, pid: int
    ) -> None:
        """Once, after ready: ``plan`` against what server ``pid`` says it allocated, from its output since
        its start. A log that cannot be read is a missing check, never a failed run."""
        if plan is None:
            self.actual_missing = "the start had no plan"
            return
        try:
            lines = await asyncio.to_thread(logs.lines_of_last_run, self._log_path, _LOAD_LINES_READ)
        except OSError as exc:
            self.actual_missing = f"the server's log could not be read: {exc.strerror or exc}"
            return
        found = backend.check_plan(plan, lines)
        if isinstance(found, str):
            self.actual, self.actual_missing = None, found
            return
        local = [d.gpu for d in plan.devices if d.endpoint is None]
        if local and self._parts.gpu_processes is not None:
            found = with_process_mib(found, plan, pid, await self._parts.gpu_processes(local))
        found = found.model_copy(update={"findings": verdict.findings(self._group, found)})
        await self._keep_measurement(plan, found, backend, settings, spec)
        # Shown once filed: whoever sees the check may plan from what it measured (the next plan reads it);
        # its findings told once shown: whoever hears one finds the check it comes from.
        self.actual = found
        for finding in found.findings:  # short: a warning (the way to an out-of-memory crash); over: unused
            self._record.emit("plan-warning" if finding.over else "plan-info", finding.message)

    async def _keep_measurement(
        self, plan: Plan, check: PlanCheck, backend: ServerBackend, settings: ModelSettings, spec: LaunchSpec | None
    ) -> None:
        """File what the server measured, for the next plan of the same model, settings and server."""
        measuring = self._parts.measuring
        model_file = backend.model_file(settings)
        if measuring is None or spec is None or model_file is None:
            return
        binary = Path(spec.argv[0])

        def record() -> None:
            measuring.record(self._group, settings, model_file, binary, plan, check)

        notice = await asyncio.to_thread(self._parts.writes.attempt, str(measuring.path), record)
        if notice is not None:
            self._record.emit("storage", notice)
