"""What crosses the wire: the one typed schema of the REST API, shared by the daemon, the client and the CLI.

Field names carry their units. This module imports pydantic and nothing heavier, so the command line can
use it without loading the planner, the GPU libraries or the web framework.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Wire(BaseModel):
    # Validators are built on first use: a command pays only for the types it reads.
    model_config = ConfigDict(defer_build=True)


# ---- instances --------------------------------------------------------------------------------------


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


class Event(_Wire):
    time: str
    # state | exit | error | warning | thermal | vram | on-demand | evict | idle | drain | roll | download
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


# ---- plans ------------------------------------------------------------------------------------------


class DevicePlan(_Wire):
    gpu: int
    uuid: str
    name: str
    layers: int
    output_layer: bool
    weights_mib: int
    kv_cache_mib: int
    compute_mib: int
    overhead_mib: int
    total_mib: int
    usable_mib: int
    free_after_mib: int
    recurrent_mib: int = 0  # recurrent state (Mamba, RWKV, hybrids): llama-server's "RS buffer"
    projector_mib: int = 0  # the multimodal projector's weights (--mmproj)
    output_mib: int = 0  # the logits' buffer: measured only (an estimate counts it in compute_mib)
    host: str = "local"  # the peer (by name) whose RPC device this is; `gpu` is that peer's index
    endpoint: str | None = None  # a remote device's rpc-server, HOST:PORT as `--rpc` names it


class NetworkCost(_Wire):
    """What a split across hosts sends over the network (layer split: each boundary between devices on
    different hosts carries one token's activations; RPC devices on different servers exchange through
    this host, so such a boundary crosses twice)."""

    crossings: int  # activation transfers over the network per token
    bytes_per_prompt_token: int  # crossings x n_embd x 4 (activations are f32)
    bytes_per_generated_token: int  # the same, plus the logits (n_vocab x 4) when the last device is remote


class HostPlan(_Wire):
    weights_mib: int
    kv_cache_mib: int
    compute_mib: int
    recurrent_mib: int = 0
    projector_mib: int = 0
    output_mib: int = 0


class QuantPlan(_Wire):
    """One model of a hub repo planned from its header: its quant, whether it fits and why not."""

    quant: str | None  # None: its file names no quant
    files: list[str]
    size_bytes: int
    fits: bool
    reason: str | None
    chosen: bool = False
    ctx: int | None = None  # the context its plan has (with `ctx: max`, the largest it would get)


class HubPlan(_Wire):
    """Where a hub model's plan came from: the commit, the files, the header bytes read to plan them."""

    reference: str  # hf:ORG/REPO[:QUANT]
    repo: str
    revision: str
    commit: str
    files: list[str]  # of the model planned (a split model's all)
    size_bytes: int
    header_bytes: int  # the start of each file read to plan, summed
    fetched_bytes: int  # of them, fetched from the hub now (the rest came from the header cache)
    quants: list[QuantPlan] = []  # every quant planned, smallest first (a reference without a quant)


class ContextChoice(_Wire):
    """How `ctx: max` chose the plan's context: the range it searched, in llama.cpp's steps, and why it
    stopped where it did."""

    ctx_min: int  # -c of the smallest context allowed (ctx_min per KV stream, rounded up to the step)
    ctx_max: int  # -c of the largest (the cap per KV stream, rounded down to the step)
    step: int  # cells of -c per step: 256 per KV stream, as llama.cpp pads n_ctx
    reason: str  # why this context: the largest that fits beside the claims, the cap, or the floor refused


class Plan(_Wire):
    model: str
    backend: str
    fits: bool
    reason: str | None
    suggestions: list[str]
    ctx: int
    flash_attn: bool
    cache_type_k: str
    cache_type_v: str
    gpu_layers: int
    devices: list[DevicePlan]
    host: HostPlan
    tensor_split: list[float]
    command: list[str] = []
    env: dict[str, str] = {}
    architecture: str = ""
    parallel: int = 4  # slots (-np; llama-server's auto is 4)
    kv_unified: bool = True  # the slots share one KV cache of ctx cells (else ctx/parallel each)
    swa_full: bool = False
    ubatch: int = 512  # tokens the compute buffers are reserved for: min(-ub, -b)
    sliding_window: int = 0  # tokens; 0: no sliding-window layers
    swa_layers: int = 0  # layers whose KV cache holds only the window
    recurrent_layers: int = 0  # layers with a recurrent state instead of (or beside) a KV cache
    warnings: list[str] = []
    not_modelled: list[str] = []  # flags in args whose effect on memory the plan does not follow
    network: NetworkCost | None = None  # None: every device is this host's
    hub: HubPlan | None = None  # a hub model planned from its headers before download
    context: ContextChoice | None = None  # `ctx: max`: how ctx was chosen (None: ctx is the configured one)
    # When its terms are what a server measured with the same file, settings and server (that day, ISO
    # 8601); None: estimated from the header (launcher/plan/measured.py)
    measured: str | None = None
    split_mode: str = "layer"  # layer | tensor: how the server divides the model over its devices
    split_reason: str = ""  # why that mode (`split_mode: auto`'s choice, or a fallback)

    @property
    def claims_mib(self) -> dict[int, int]:
        """MiB this plan takes on each of this host's GPUs (what other instances must plan around)."""
        return {d.gpu: d.total_mib for d in self.devices if d.host == "local"}


class TermCheck(_Wire):
    """One term of one device: what the plan said, what the server reports allocating, and the difference."""

    planned_mib: float
    actual_mib: float
    difference_mib: float  # actual - planned: above zero, the plan was short


class DeviceCheck(_Wire):
    """One device of a running server, planned against what the server reports allocating there."""

    device: str  # as the server names it (CUDA0, RPC0[HOST:PORT], CPU for the host); the plan's name if unseen
    host: str = "local"  # the peer whose RPC device it is (the plan's DevicePlan.host)
    gpu: int | None = None  # the plan's GPU index there; None: the host's memory (CPU)
    endpoint: str | None = None  # a remote device's rpc-server, HOST:PORT
    seen: bool  # the server's log names it: False, it allocated nothing there (or its log says nothing)
    # weights (model buffers and the projector), kv, state (recurrent), compute, output, other (a buffer
    # of a kind the launcher does not know). The driver's share (the plan's overhead_mib) is not in it:
    # the server's log cannot see it.
    terms: dict[str, TermCheck]
    planned_mib: float
    actual_mib: float
    difference_mib: float
    # What the GPU reading (NVML) says the server's process holds on this GPU: the buffers and the driver's
    # own share. None: not a local GPU, or no reading of processes (simulated GPUs, no permission).
    process_mib: int | None = None


class PlanFinding(_Wire):
    """A device where the plan was off by more than the planner's tolerance (launcher/plan/verdict.py)."""

    device: str
    term: str  # kv | total
    mostly: str | None = None  # of a total: the term that moved it most
    planned_mib: float
    actual_mib: float
    difference_mib: float
    over: bool  # True: the server took more than planned (a warning); False: memory left unused (information)
    message: str  # names the model, device, term and amount


class PlanCheck(_Wire):
    """A ready server's plan against what it reports allocating, per device and term (llama-server's load
    log; issue 23)."""

    source: str  # where the actual figures come from
    devices: list[DeviceCheck]  # the plan's devices in llama.cpp's order, then the host
    unmatched: list[str] = []  # buffers the server named on a device the plan does not have
    findings: list[PlanFinding] = []  # devices off the plan by more than the tolerance


class Download(_Wire):
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


class InstanceStatus(_Wire):
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


class Health(_Wire):
    """`GET /health`: ok (200) when every autostart instance is ready with a live server process and no
    instance claims a server that is gone; degraded (503) otherwise."""

    status: Literal["ok", "degraded"]
    instances: dict[str, State]
    # What is wrong besides: an instance that says it runs while its process is gone (then degraded), the
    # state directory failing writes (the servers run on: no effect on status).
    warnings: list[str] = []
    # When the daemon's running program started (epoch seconds): an upgrade starts a new one in the same process.
    program_started_at: float | None = None


class ErrorBody(_Wire):
    """Every error the API answers: one sentence, and a hint where there is one."""

    detail: str
    hint: str | None = None


# ---- reloads ----------------------------------------------------------------------------------------


class Change(StrEnum):
    """What a reload does to one instance."""

    KEPT = "kept"  # settings unchanged: not touched
    RESTARTED = "restarted"  # a key that the server's command depends on changed
    LIVE_UPDATED = "live-updated"  # only keys the daemon applies without a restart changed
    STOPPED = "stopped"  # gone from the configuration: stopped and removed
    ADDED = "added"  # new in the configuration (started when autostart)
    UPDATED = "updated"  # changed while it did not run: its next start takes the new settings
    FAILED = "failed"  # the change was applied, but its server did not start again (see `reason`)


class InstanceChange(_Wire):
    name: str  # the instance: a configured model, or a replica NAME@N
    model: str  # the configured model it is
    change: Change
    keys: list[str] = []  # the model's keys that differ, for restarted and live-updated (rpc.listen: an rpc-server's)
    reason: str | None = None  # why a change failed


class RollReport(_Wire):
    """A rolling restart of a model's replicas: one at a time, each ready again before the next."""

    model: str  # the configured model
    order: list[str]  # its replicas in the order they were (or were to be) restarted
    restarted: list[str]  # those restarted and back (ready, or left stopped), in that order
    left_out: list[str] = []  # those passed over: stopped by hand or removed by a reload during the roll
    stopped_at: str | None = None  # the replica where the roll stopped; the ones after it keep their old server
    reason: str | None = None  # why it stopped there
    duration_s: float

    def describe(self) -> str:
        """One line: rolled, or where it stopped and why, and what kept its old server."""
        passed = f"; left out (stopped or removed meanwhile): {', '.join(self.left_out)}" if self.left_out else ""
        if self.stopped_at is None:
            restarted = ", ".join(self.restarted) or "no replica"
            return f"rolled {self.model}: {restarted} restarted one at a time in {self.duration_s:.2f}s{passed}"
        gone = {*self.restarted, *self.left_out, self.stopped_at}
        kept = [name for name in self.order if name not in gone]
        return (
            f"rolling restart of {self.model} stopped at {self.stopped_at}: {self.reason}"
            + (f"; restarted: {', '.join(self.restarted)}" if self.restarted else "")
            + (f"; kept their old server: {', '.join(kept)}" if kept else "")
            + passed
        )


class ReloadReport(_Wire):
    """What a reload did, or would do (``dry_run``), per instance and to the daemon's own settings."""

    dry_run: bool
    source: str  # the configuration file read
    instances: list[InstanceChange]
    applied: list[str] = []  # the daemon-level keys (dotted) that changed and were applied live
    waiting: list[str] = []  # the daemon-level keys that changed and wait for a restart of the daemon

    @property
    def failures(self) -> list[InstanceChange]:
        """The changes that failed (their servers did not start again)."""
        return [i for i in self.instances if i.change == Change.FAILED]

    def describe(self) -> str:
        """One line: the instances by what was (or would be) done to them, then the daemon-level keys."""
        done = [
            f"{change.value} {', '.join(_with_keys(i) for i in self.instances if i.change == change)}"
            for change in Change
            if any(i.change == change for i in self.instances)
        ]
        if self.applied:
            done.append(f"applied {', '.join(self.applied)}")
        if self.waiting:
            done.append(f"waiting for a restart of the daemon: {', '.join(self.waiting)}")
        return ("would reload: " if self.dry_run else "reloaded: ") + ("; ".join(done) or "no model configured")


class UpgradeStarted(_Wire):
    """`POST /daemon/upgrade` (202): the daemon drains its API and executes its program again in this
    process; the upgrade is done once `/health` shows another ``program_started_at``."""

    pid: int
    program_started_at: float  # of the program being replaced


def _with_keys(change: InstanceChange) -> str:
    named = f"{change.name} ({', '.join(change.keys)})" if change.keys else change.name
    return named if change.reason is None else f"{named}: {change.reason}"


# ---- the front door ---------------------------------------------------------------------------------


class RequestRecord(_Wire):
    """One request the front door (/v1, /upstream) answered: `GET /requests` lists the recent ones."""

    time: str  # when it arrived
    model: str  # the configured model it was routed to
    instance: str | None  # None: answered by the front door itself (404, 429, 503)
    method: str
    path: str
    status: int
    streamed: bool
    ttfb_ms: float | None  # arrival to the first byte of the upstream's body
    duration_ms: float
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    tokens_per_s: float | None = None  # generation speed, as the server reports it where it does


# ---- RPC workers -------------------------------------------------------------------------------------


class RpcDevice(_Wire):
    """A GPU an rpc-server lends, as this host's GPU sampler last read it."""

    gpu: int
    uuid: str
    name: str
    memory_total_mib: int | None
    memory_free_mib: int | None
    # What a llama-server elsewhere may put on it: min(free, total - this host's claims) less its margin
    # and reserve (the rpc-server's own driver context is one of those claims). None: not readable.
    usable_mib: int | None = None


class RpcClaim(_Wire):
    """Memory a llama-server elsewhere has reserved on a lent GPU (registered by the peer that plans it)."""

    holder: str  # who: the peer and its instance
    gpu: int
    memory_mib: int
    expires_in_s: float = 0.0  # the lease: gone unless its holder renews it by then


class ClaimDevice(_Wire):
    gpu: int
    memory_mib: Annotated[int, Field(ge=0)]


class ClaimRequest(_Wire):
    """`POST /rpc/claims`: reserve (or renew) ``devices`` of one endpoint for ``holder`` for ``ttl_s``."""

    holder: Annotated[str, Field(min_length=1)]  # the claiming launcher's URL and instance: `http://a:8400#big`
    endpoint: Annotated[str, Field(min_length=1)]  # HOST:PORT of the rpc-server (one holder per endpoint)
    devices: Annotated[list[ClaimDevice], Field(min_length=1)]
    # A lease: gone unless renewed by then. At most 10 minutes: a vanished claimer's memory comes back.
    ttl_s: Annotated[float, Field(gt=0, le=600)]


class RpcEndpoint(_Wire):
    """One ready rpc-server of this host: where to point `llama-server --rpc`, and what it lends."""

    name: str  # its instance
    endpoint: str  # HOST:PORT
    protocol: str  # its RPC protocol version: a llama-server needs the same major
    server_devices: int  # devices the server itself reports (on a CPU-only build: the CPU)
    devices: list[RpcDevice]
    clients: list[str]  # HOST:PORT of each connection now: it serves one, the others wait
    claims: list[RpcClaim] = []


class RpcReport(_Wire):
    """`GET /rpc`: this host's RPC endpoints, for peers that plan onto them."""

    endpoints: list[RpcEndpoint]


class ServedModel(_Wire):
    """One entry of a front door's `GET /v1/models`: a model or an alias, with its state; ``peer`` names
    the launcher that serves it when that is not this one."""

    id: str
    state: str
    aliases: list[str] = []
    alias_of: str | None = None
    peer: str | None = None


class ModelList(_Wire):
    """`GET /v1/models`, OpenAI's list (only the fields a launcher reads of a peer's)."""

    data: list[ServedModel]


class PeerStatus(_Wire):
    """`GET /peers`: what this daemon last read of one peer's `GET /rpc` and its front door's models."""

    name: str
    url: str
    reachable: bool
    error: str | None  # why the last read failed
    read_s_ago: float | None  # None: never read
    endpoints: list[RpcEndpoint]  # as last read (kept through a failure, but not planned onto then)
    # The models its own servers serve, as last read (kept through a failure, not routed to then).
    models: list[ServedModel] = []


# ---- GPUs -------------------------------------------------------------------------------------------


class GpuProcess(_Wire):
    model_config = ConfigDict(frozen=True, defer_build=True)

    pid: int
    used_mib: int | None


class GpuLinkReading(_Wire):
    """One NVLink (NVIDIA) or xGMI (AMD) link of a GPU at one time. None: the library does not say."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    link: int  # the link's number on its GPU
    kind: str  # nvlink | xgmi
    up: bool
    peer: str | None = None  # the GPU index at its other end, else that end's PCI bus id (an NVSwitch)
    speed_mbps: float | None = None  # the speed it runs at, MB/s
    speed_max_mbps: float | None = None  # the speed it can run at, MB/s
    tx_bytes_per_second: float | None = None
    rx_bytes_per_second: float | None = None


class GpuReading(_Wire):
    """What a backend reads of one GPU at one time. None: the backend cannot read that value."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    memory_total_mib: int | None = None
    memory_used_mib: int | None = None
    temperature_c: float | None = None
    temperature_hotspot_c: float | None = None
    utilization_pct: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    pcie_gen: int | None = None
    pcie_gen_max: int | None = None
    pcie_width: int | None = None
    pcie_width_max: int | None = None
    pcie_tx_bytes_per_second: float | None = None
    pcie_rx_bytes_per_second: float | None = None
    links: tuple[GpuLinkReading, ...] = ()  # NVLink or xGMI; none on a GPU without them
    throttle: tuple[str, ...] = ()
    processes: tuple[GpuProcess, ...] | None = None  # None: not read this time


class GpuSample(GpuReading):
    """One GPU at one time, as the API, the CLI and the planner see it: its identity and reading."""

    index: int
    uuid: str
    name: str
    pci_bus_id: str | None
    vendor: str
    time: float  # seconds since the epoch
    memory_free_mib: int | None = None
    instances: list[str] = []
    error: str | None = None


class GpuLink(_Wire):
    """How two GPUs reach each other."""

    gpus: tuple[int, int]
    link: str  # nvlink | xgmi | board | switch | host-bridge | cpu | cross-cpu
    direct: bool  # peer to peer without the CPU: a split across them is fast


class GpuTopology(_Wire):
    """`GET /gpus/topology`: how the GPUs are joined, and the limits the daemon watches them against."""

    links: list[GpuLink]
    thermal_limit_c: float
    poll_interval_s: float
