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

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from launcher.address import reach
from launcher.config_yaml import clip
from launcher.errors import NotFoundError
from launcher.server_args import check_args

Port = Annotated[int, Field(ge=1, le=65535)]
NonNegative = Annotated[float, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]


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
    host: str = "127.0.0.1"
    port: Port = 8400
    state_dir: Path = Field(default_factory=default_state_dir)
    token_file: Path | None = None
    # `port: auto` instances get the first free port of this range.
    instance_ports: tuple[Port, Port] = (8410, 8499)
    # Server logs are rotated (copy-truncate) past this size, keeping this many old ones.
    log_max_mib: Annotated[float, Field(gt=0)] = 50.0
    log_keep: Annotated[int, Field(ge=1)] = 3
    # Do reads (logs, plans, events, GPUs, metrics) need the token? auto: when the daemon listens
    # beyond loopback. /health never does.
    auth_reads: Literal["auto", "always", "never"] = "auto"
    # When systemd hears READY=1: once the API listens and the autostart instances are launched, or once
    # each of them is loaded (ready, or failed for good) so units ordered After= it find them serving.
    ready_when: Literal["listening", "loaded"] = "listening"
    # A token file readable by others (or, if it is the user's own, by its group) is refused, as ssh refuses
    # such a key; true accepts one with a warning at every load.
    allow_readable_secrets: bool = False
    # Names and addresses a request may give as its Host besides localhost, loopback addresses and the bind
    # address (after a wildcard bind, any address): a page that rebinds its own name to this machine is
    # refused. "*.example.com": every name under it; "*": any name (the check is off).
    allowed_hosts: list[str] = Field(default_factory=list)
    # Origins (scheme://host[:port]) whose web pages may call the API (CORS); pages of any other origin
    # are refused.
    cors_origins: list[str] = Field(default_factory=list)

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

    # HTTP limits before any authentication: a request's head, and then its body, must arrive within this
    # many seconds (else 408 and the connection closed); the request bodies the daemon holds at once, all
    # connections together, stay under the budget (beyond it: 503 with Retry-After).
    request_timeout_s: Positive = 30.0
    body_budget_mib: Annotated[int, Field(ge=64)] = 256

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

    name: str
    memory_mib: Annotated[int, Field(gt=0)]
    vendor: Literal["nvidia", "amd"] = "nvidia"
    uuid: str | None = None
    pci_bus_id: str | None = None
    used_mib: Annotated[int, Field(ge=0)] = 0  # foreign usage: a display, another program
    # A list is a script: one value per reading, the last one kept.
    temperature_c: float | Annotated[list[float], Field(min_length=1)] = 40.0
    utilization_pct: Annotated[float, Field(ge=0, le=100)] = 0.0
    power_w: Annotated[float, Field(ge=0)] = 30.0
    power_limit_w: Annotated[float, Field(gt=0)] = 350.0
    pcie_gen: Annotated[int, Field(ge=1)] = 4
    pcie_gen_max: Annotated[int, Field(ge=1)] = 4
    pcie_width: Annotated[int, Field(ge=1)] = 16
    pcie_width_max: Annotated[int, Field(ge=1)] = 16
    link_group: str | None = None  # GPUs of one group are directly linked (NVLink); others via the CPU
    # Memory a stopped server held comes back after this long, as on real GPUs (llama-swap issue 97).
    release_delay_s: NonNegative = 0.0

    @model_validator(mode="after")
    def _fits(self) -> SimGpu:
        if self.used_mib > self.memory_mib:
            raise ValueError(f"used_mib {self.used_mib} exceeds memory_mib {self.memory_mib}")
        return self


class GpuSettings(_Strict):
    backend: Literal["auto", "nvml", "amdsmi", "sysfs", "sim", "none"] = "auto"
    poll_interval: Positive = 1.0
    margin_mib: Annotated[int, Field(ge=0)] = 1024
    # The driver's context on each GPU a server uses (CUDA/ROCm runtime, cuBLAS workspace): not in
    # llama.cpp's own buffer sizes, but taken from the card all the same.
    overhead_mib: Annotated[int, Field(ge=0)] = 512
    reserve_mib: dict[int, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)
    thermal_limit_c: Positive = 90.0
    thermal_action: Literal["warn", "stop"] = "warn"  # stop: the instances on a hot GPU are stopped
    history: Annotated[int, Field(ge=1)] = 600  # readings kept per GPU (10 minutes at 1 Hz)
    process_every: Annotated[int, Field(ge=1)] = 5  # per-process memory is costly: every Nth poll
    # Before starting on GPUs a stopped server used, wait up to this long for its memory to come back.
    vram_wait_s: NonNegative = 30.0
    sim: list[SimGpu] = Field(default_factory=list)


class RestartSettings(_Strict):
    policy: Literal["always", "on-failure", "never"] = "on-failure"
    backoff_initial: NonNegative = 1.0
    backoff_max: NonNegative = 60.0
    # More than `burst` restarts within `interval` seconds -> failed.
    burst: Annotated[int, Field(ge=0)] = 5
    interval: Positive = 300.0
    # Ready for this long, the instance counts as healthy again and backoff starts over.
    reset_after: NonNegative = 60.0

    @model_validator(mode="after")
    def _backoff_order(self) -> RestartSettings:
        if self.backoff_initial > self.backoff_max:
            raise ValueError("backoff_initial must not exceed backoff_max")
        return self


class HealthSettings(_Strict):
    interval: Positive = 5.0
    timeout: Positive = 5.0
    # Consecutive failed probes of a ready instance before it is declared unhealthy and replaced.
    failures: Annotated[int, Field(ge=1)] = 3
    # Loading a 70B model from disk takes minutes; past this the start counts as failed.
    load_timeout: Positive = 900.0


class OllamaSettings(_Strict):
    """What `ollama serve` is told through its environment (OLLAMA_*)."""

    keep_alive: str = "-1"  # keep the model loaded: the launcher decides when it goes
    num_parallel: Annotated[int, Field(ge=1)] | None = None
    max_loaded_models: Annotated[int, Field(ge=1)] | None = None
    flash_attention: bool | None = None
    kv_cache_type: Literal["f16", "q8_0", "q4_0"] | None = None
    gpu_overhead_mib: Annotated[int, Field(ge=0)] | None = None
    models_dir: Path | None = None  # OLLAMA_MODELS; also where the planner looks for the model's blob
    size_mib: Annotated[int, Field(gt=0)] | None = None  # for planning when the blob cannot be found


# Keys of an entry that serves a model; an rpc-server serves its GPUs to llama-servers elsewhere instead.
_MODEL_ONLY = (
    "model",
    "ctx",
    "tensor_split",
    "allow_cpu_offload",
    "ollama",
    "aliases",
    "on_demand",
    "idle_ttl_s",
    "max_concurrency",
    "queue_max",
    "queue_timeout_s",
)


class ModelSettings(_Strict):
    # rpc-server: llama.cpp's ggml-rpc-server, lending the entry's GPUs to a llama-server elsewhere.
    backend: Literal["llama-server", "ollama", "rpc-server"] = "llama-server"
    # llama-server: the GGUF file. ollama: the model's name in Ollama (`qwen2.5:72b`). rpc-server: none.
    model: Path | None = Field(default=None, validate_default=True)
    binary: Path | None = None
    ctx: Annotated[int, Field(gt=0)] | None = None
    gpus: Literal["auto"] | list[int | str] = "auto"
    tensor_split: Literal["auto"] | list[Annotated[float, Field(ge=0)]] = "auto"
    port: Literal["auto"] | Port = "auto"
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    autostart: bool = False
    # When the model does not fit the GPUs: run the layers that do not fit on the CPU (much slower).
    allow_cpu_offload: bool = False
    stop_timeout: Positive = 10.0
    restart: RestartSettings = Field(default_factory=RestartSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    ollama: OllamaSettings = Field(default_factory=OllamaSettings)
    # ollama: one instance per GPU (`per-gpu`) or N instances, each on its own GPU and port.
    replicas: Literal["per-gpu"] | Annotated[int, Field(ge=1)] = 1
    # The front door (/v1, /upstream): other names it answers to, starting on the first request, stopping
    # when unused, and how many requests each instance takes before the rest wait in a bounded queue.
    aliases: list[str] = Field(default_factory=list)
    on_demand: bool = False
    idle_ttl_s: Positive | None = None
    max_concurrency: Annotated[int, Field(ge=1)] | None = None  # None: the server's slots
    queue_max: Annotated[int, Field(ge=0)] = 64
    queue_timeout_s: Positive = 60.0
    # Where the layers may go: this host's GPUs only (`local`), or also the RPC devices of peers (`auto`:
    # any peer; or a list of peers by name or URL), local GPUs first, then the fewest hosts.
    hosts: Literal["local", "auto"] | list[str] = "local"

    @field_validator("model")
    @classmethod
    def _model_for_servers(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None and info.data.get("backend") in ("llama-server", "ollama"):
            raise PydanticCustomError("missing", "Field required")
        return value

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
    def _split_fits_gpus(self) -> ModelSettings:
        split, gpus = self.tensor_split, self.gpus
        if isinstance(split, list) and isinstance(gpus, list) and len(split) > len(gpus):
            raise ValueError(f"tensor_split has {len(split)} entries but gpus lists {len(gpus)}")
        return self


class RouterSettings(_Strict):
    """The OpenAI-compatible front door on the daemon's port."""

    # Bearer keys for /v1 and /upstream (the daemon's API token is taken too). None: open on loopback; on a
    # public bind the daemon's token is then the only key.
    api_keys: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    # idle: an on-demand model with no request in flight may be stopped to make room for another.
    evict: Literal["idle", "never"] = "idle"


class RpcSettings(_Strict):
    """What the rpc-server entries of this host bind to."""

    # Declared before `listen`, whose check reads it.
    allow_public: bool = False
    listen: str = "127.0.0.1"
    # How often each peer's GET /rpc is read, and the claims this host holds there renewed. A claim lives
    # claim_ttl_s after its last renewal on the peer: a claimer that vanishes frees the memory by then.
    peer_interval_s: Positive = 5.0
    claim_ttl_s: Positive = 30.0

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

    url: str
    token_file: Path | None = None
    name: str | None = None  # how plans and `hosts:` name it; default the URL's host:port

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
    models: dict[str, ModelSettings] = Field(default_factory=dict)
    router: RouterSettings = Field(default_factory=RouterSettings)
    rpc: RpcSettings = Field(default_factory=RpcSettings)
    peers: list[PeerSettings] = Field(default_factory=list)
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
