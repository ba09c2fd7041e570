"""The wire types of instances: their states, events, downloads, status, and the daemon's health."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from launcher.schema import WireModel
from launcher.schema_plans import Plan, PlanCheck


class State(StrEnum):
    STOPPED = "stopped"
    DOWNLOADING = "downloading"  # a hub model's files being fetched into the Hugging Face cache before its start
    STARTING = "starting"  # process being spawned
    LOADING = "loading"  # process up, health not yet 200
    READY = "ready"
    UNHEALTHY = "unhealthy"  # health probes failing
    DRAINING = "draining"  # a planned stop waits for the front door's requests in flight; given no new one
    BACKOFF = "backoff"  # waiting to restart
    FAILED = "failed"  # gave up; needs a start or restart
    STOPPING = "stopping"
    DEGRADED = "degraded"  # stopped because a peer's rpc-server its plan uses went away; starts when it is back


class Event(WireModel):
    time: str
    # state | exit | error | warning | thermal | vram | on-demand | evict | idle | drain | roll | download | stall
    # | plan-warning (a plan the server exceeded) | plan-info (memory the plan left unused): plan/verdict.py
    kind: str
    message: str
    instance: str | None = None
    state: State | None = None  # the instance's state after the event
    gpu: int | None = None

    @classmethod
    def now(cls, kind: str, message: str, **about: object) -> Event:
        stamp = datetime.now().astimezone().isoformat(timespec="milliseconds")
        return cls.model_validate({"time": stamp, "kind": kind, "message": message, **about})

    def describe(self) -> str:
        """'NAME: STATE (detail)' for a state change, 'WHO: KIND: message' otherwise."""
        who = self.instance if self.instance is not None else f"GPU {self.gpu}" if self.gpu is not None else "daemon"
        if self.kind == "state" and self.state is not None:
            detail = "" if self.message == self.state.value else f" ({self.message})"
            return f"{who}: {self.state.value}{detail}"
        return f"{who}: {self.kind}: {self.message}"


class Download(WireModel):
    """A download under way (a hub model's files before its start): what is done, and when it may end."""

    done_bytes: int
    total_bytes: int
    rate_bytes_s: float  # over the last seconds
    eta_s: float | None  # None: no rate measured yet
    file: str  # the one being fetched

    def describe(self) -> str:
        """One line: `1.20 of 4.50 GB (27 %), 80.0 MB/s, about 41 s left` (MB for a total under a GB)."""
        share = 100 * self.done_bytes / self.total_bytes if self.total_bytes else 100.0
        unit, scale = ("GB", 1e9) if self.total_bytes >= 1e9 else ("MB", 1e6)
        left = f", about {self.eta_s:.0f} s left" if self.eta_s is not None else ""
        return (
            f"{self.done_bytes / scale:.2f} of {self.total_bytes / scale:.2f} {unit} ({share:.0f} %), "
            f"{self.rate_bytes_s / 1e6:.1f} MB/s{left}"
        )


class InstanceStatus(WireModel):
    name: str
    model: str
    backend: str
    state: State
    pid: int | None
    port: int | None
    gpus: list[int]
    tensor_split: list[float]
    vram_mib: int | None  # planned, over all its GPUs
    restarts: int
    last_exit: str | None
    last_exit_code: int | None
    last_exit_signal: int | None
    last_error: str | None
    autostart: bool
    state_age_s: float
    uptime_s: float | None  # time ready, None unless ready or unhealthy
    log_path: str
    log_line: str | None
    log_tail: list[str]  # the last lines of the server's output, kept when it failed
    plan: Plan | None  # the plan of the current (or last) start
    server_info: dict[str, int]  # what the server reports (Ollama: size_bytes, size_vram_bytes)
    group: str  # the model's name: replicas share it
    events: list[Event]
    requests_in_flight: int = 0  # front-door requests this instance is serving now
    requests_queued: int = 0  # front-door requests for its model waiting for a free instance
    degraded_reason: str | None = None  # while degraded: which peer or rpc-server is away
    # Once ready: the plan against what the server reports allocating; None before, or when the server
    # does not say (Ollama; a llama-server that logs below -lv 4, see actual_missing).
    actual: PlanCheck | None = None
    actual_missing: str | None = None  # why there is no `actual` for a ready server
    download: Download | None = None  # while downloading


class Health(WireModel):
    """`GET /health`: ok (200) when every autostart instance is ready with a live server process and no
    instance claims a server that is gone; degraded (503) otherwise."""

    status: Literal["ok", "degraded"]
    instances: dict[str, State]
    # What is wrong besides: an instance that says it runs while its process is gone (then degraded), the
    # state directory failing writes (the servers run on: no effect on status).
    warnings: list[str] = []
    # When the daemon's running program started (epoch seconds): an upgrade starts a new one in the same process.
    program_started_at: float | None = None
