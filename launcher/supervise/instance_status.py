"""What the API shows of one instance (`GET /instances`, `launcher status`), built from its parts: what
it is (its name, settings, placement), what it shows (its record), its runs, its plan check, its download."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from launcher.config_model import ModelSettings
from launcher.plan.placement import Placement
from launcher.schema_instances import InstanceStatus, State
from launcher.schema_plans import Plan
from launcher.statedir import logs
from launcher.supervise.download_task import DownloadTask
from launcher.supervise.plan_check import PlanChecker
from launcher.supervise.record import InstanceRecord
from launcher.supervise.server_runs import LOG_LINES_READ, ServerRuns


@dataclass(frozen=True)
class Shown:
    """An instance as it stands now, to be shown."""

    name: str
    group: str
    settings: ModelSettings
    port: int | None
    placement: Placement
    plan: Plan | None
    log_path: Path


def instance_status(
    shown: Shown,
    record: InstanceRecord,
    runs: ServerRuns,
    checker: PlanChecker,
    download: DownloadTask,
    *,
    events: int,
    requests: tuple[int, int],
) -> InstanceStatus:
    """The instance ``shown`` with its last ``events``; ``requests``: the front door's requests in flight and
    queued on it."""
    now = time.monotonic()
    settings, placement, last_exit, proc = shown.settings, shown.placement, runs.last_exit, runs.process
    ready_for_s, running = runs.ready_for_s, proc is not None and proc.running
    return InstanceStatus(
        name=shown.name,
        model=str(settings.model) if settings.model is not None else "",  # an rpc-server has none
        backend=settings.backend,
        state=record.state,
        pid=proc.pid if proc is not None else None,
        port=shown.port,
        gpus=list(placement.gpus) if runs.active else [],
        tensor_split=list(placement.tensor_split),
        vram_mib=sum(placement.claims_mib.values()) if runs.active and placement.gpus else None,
        restarts=runs.restarts,
        last_exit=last_exit.describe() if last_exit else None,
        last_exit_code=last_exit.code if last_exit else None,
        last_exit_signal=last_exit.signal if last_exit else None,
        last_error=record.last_error,
        autostart=settings.autostart,
        state_age_s=round(now - record.state_since_s, 3),
        uptime_s=round(ready_for_s, 3) if ready_for_s is not None else None,
        log_path=str(shown.log_path),
        log_line=logs.last_line(shown.log_path),
        # Why it is down, in the server's words: what it wrote before it last ended.
        log_tail=(
            logs.lines_of_last_run(shown.log_path, LOG_LINES_READ)[-10:]
            if record.state in (State.FAILED, State.BACKOFF)
            else []
        ),
        plan=shown.plan,
        server_info=runs.server_info,
        group=shown.group,
        events=list(record.events)[-events:] if events > 0 else [],
        requests_in_flight=requests[0],
        requests_queued=requests[1],
        degraded_reason=record.degraded_reason,
        actual=checker.actual if running else None,
        actual_missing=checker.actual_missing if running else None,
        download=download.progress if record.state == State.DOWNLOADING else None,
    )
