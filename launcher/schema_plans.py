"""The wire types of plans: where a model's layers and buffers go and why, and a ready server's plan checked
against what it reports allocating.
"""

from __future__ import annotations

from launcher.schema import WireModel


class DevicePlan(WireModel):
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


class NetworkCost(WireModel):
    """What a split across hosts sends over the network (layer split: each boundary between devices on
    different hosts carries one token's activations; RPC devices on different servers exchange through
    this host, so such a boundary crosses twice)."""

    crossings: int  # activation transfers over the network per token
    bytes_per_prompt_token: int  # crossings x n_embd x 4 (activations are f32)
    bytes_per_generated_token: int  # the same, plus the logits (n_vocab x 4) when the last device is remote


class HostPlan(WireModel):
    weights_mib: int
    kv_cache_mib: int
    compute_mib: int
    recurrent_mib: int = 0
    projector_mib: int = 0
    output_mib: int = 0


class QuantPlan(WireModel):
    """One model of a hub repo planned from its header: its quant, whether it fits and why not."""

    quant: str | None  # None: its file names no quant
    files: list[str]
    size_bytes: int
    fits: bool
    reason: str | None
    chosen: bool = False
    ctx: int | None = None  # the context its plan has (with `ctx: max`, the largest it would get)


class HubPlan(WireModel):
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


class ContextChoice(WireModel):
    """How `ctx: max` chose the plan's context: the range it searched, in llama.cpp's steps, and why it
    stopped where it did."""

    ctx_min: int  # -c of the smallest context allowed (ctx_min per KV stream, rounded up to the step)
    ctx_max: int  # -c of the largest (the cap per KV stream, rounded down to the step)
    step: int  # cells of -c per step: 256 per KV stream, as llama.cpp pads n_ctx
    reason: str  # why this context: the largest that fits beside the claims, the cap, or the floor refused


class Plan(WireModel):
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


class TermCheck(WireModel):
    """One term of one device: what the plan said, what the server reports allocating, and the difference."""

    planned_mib: float
    actual_mib: float
    difference_mib: float  # actual - planned: above zero, the plan was short


class DeviceCheck(WireModel):
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


class PlanFinding(WireModel):
    """A device where the plan was off by more than the planner's tolerance (launcher/plan/verdict.py)."""

    device: str
    term: str  # kv | total
    mostly: str | None = None  # of a total: the term that moved it most
    planned_mib: float
    actual_mib: float
    difference_mib: float
    over: bool  # True: the server took more than planned (a warning); False: memory left unused (information)
    message: str  # names the model, device, term and amount


class PlanCheck(WireModel):
    """A ready server's plan against what it reports allocating, per device and term (llama-server's load
    log; issue 23)."""

    source: str  # where the actual figures come from
    devices: list[DeviceCheck]  # the plan's devices in llama.cpp's order, then the host
    unmatched: list[str] = []  # buffers the server named on a device the plan does not have
    findings: list[PlanFinding] = []  # devices off the plan by more than the tolerance
