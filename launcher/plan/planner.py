"""The planning seam: a plan for a model given its file, GPU samples and the other instances' claims, and
the `Placement` a server is launched with, or a refusal. Nothing here runs or records a process or asks a
server backend anything: the caller hands in the model file its backend found, so both the daemon (off
its event loop) and a command that only reads (`launcher plan` without a daemon) use it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from launcher.config_gpus import GpuSettings
from launcher.config_model import ModelSettings
from launcher.errors import ConfigError, StartError
from launcher.gpu.types import GpuIdentity, Link
from launcher.hub_ref import HubRef
from launcher.plan.estimate import ModelShape, size_only
from launcher.plan.gguf import ModelFileError, read_gguf, regular_problem
from launcher.plan.measured import Measurement, with_measured
from launcher.plan.model_plan import make_plan
from launcher.plan.placement import Placement
from launcher.plan.remote import NO_REMOTE, Remote
from launcher.plan.rpc_server import lending_plan
from launcher.schema_gpus import GpuSample
from launcher.schema_plans import Plan
from launcher.server_args import MMPROJ, arg_value


@functools.lru_cache(maxsize=64)
def _model_shape(path: Path, mtime_ns: int, size: int) -> ModelShape:
    """The model's shape, read once per version of the file (mtime and size are part of the key)."""
    return ModelShape.of(read_gguf(path))


@functools.lru_cache(maxsize=64)
def _tensor_bytes(path: Path, mtime_ns: int, size: int) -> int:
    """All the weights of a file (a multimodal projector), read once per version of it."""
    return sum(t.n_bytes for t in read_gguf(path, "the --mmproj file").tensors)


def projector_bytes(model: ModelSettings) -> int:
    """The weights of the model's projector (`mmproj:`, or --mmproj in args; 0 without one). The path is
    relative to where the server runs, as llama-server reads it. A hub projector is the caller's to resolve:
    planned from its header before its download (launcher/hub/planning.py), its file in the cache after it
    (backends.base.with_local_projector): the planner reads no cache."""
    value = arg_value(model.args, *MMPROJ) or model.mmproj
    if value is None:
        return 0
    if isinstance(value, HubRef):
        raise ModelFileError(f"the projector {value} is not in the Hugging Face cache", hint="`launcher pull`")
    path = Path(value)
    problem = regular_problem(path)
    if problem is not None:  # never opened then: a FIFO would block the placement forever
        raise ModelFileError(f"the --mmproj file {path} {problem}", hint="fix the path in args")
    stat = path.stat()
    return _tensor_bytes(path, stat.st_mtime_ns, stat.st_size)


@dataclass(frozen=True)
class Measured:
    """What earlier runs measured, for one plan: the run of the same model file, settings and server
    (None: none, or not wanted), and the driver's share learned on this host's GPUs, by index."""

    run: Measurement | None = None
    overheads_mib: Mapping[int, int] = field(default_factory=dict)


NOT_MEASURED = Measured()


@dataclass(frozen=True)
class Placed:
    """A start the GPUs can take: the plan, and what the server is launched with."""

    plan: Plan
    placement: Placement


class Planner:
    """Plans models on the GPUs of one machine (identities and links do not change while it runs)."""

    def __init__(
        self, gpus: GpuSettings, identities: Sequence[GpuIdentity], links: Mapping[tuple[int, int], Link]
    ) -> None:
        self._gpus = gpus
        self._identities = list(identities)
        self._links = dict(links)

    def reconfigure(self, gpus: GpuSettings) -> None:
        """Use ``gpus`` (margins, reserve, overhead, waits) from now on: a reload."""
        self._gpus = gpus

    def plan(
        self,
        name: str,
        model: ModelSettings,
        model_file: Path | ModelShape | None,
        samples: Sequence[GpuSample],
        claims: Mapping[int, int],
        remote: Remote = NO_REMOTE,
        projector: int | None = None,
        measured: Measured = NOT_MEASURED,
    ) -> Plan:
        """The plan for ``model`` against ``samples``, around the MiB per GPU that ``claims`` hold, also
        over the peers' endpoints in ``remote`` when the model's `hosts:` allows them. ``model_file`` is
        the GGUF file its backend found (backends.planned_file), None for an rpc-server, which has no
        model, and for an Ollama model that is planned by its configured `ollama.size_mib`; or the model's
        shape, read by the caller from elsewhere (a hub model's headers, launcher/hub/); ``projector``: the
        bytes of its projector's weights when the caller read them so (None: its file's, if it has one);
        ``measured``: what earlier runs measured (launcher/supervise/measuring.py), taken where it applies."""
        self._check_gpu_refs(name, model)
        if model.backend == "rpc-server":  # no model: the GPUs it lends
            return lending_plan(name, model, samples, claims, self._gpus)
        if isinstance(model_file, ModelShape):
            shape = model_file
        elif model_file is not None:
            stat = model_file.stat()
            shape = _model_shape(model_file, stat.st_mtime_ns, stat.st_size)
        else:  # the backend checked that a size is configured
            shape = size_only((model.ollama.size_mib or 0) * 1024 * 1024)
        if projector is None:
            projector = projector_bytes(model) if model.backend == "llama-server" else 0

        def planned(at: ModelSettings, held: Mapping[int, int]) -> Plan:
            return make_plan(
                name, at, shape, samples, self._links, held, self._gpus, projector, remote, measured.overheads_mib
            )

        run = measured.run
        if model.ctx != "max" or run is None:
            return with_measured(planned(model, claims), run)
        # `ctx: max` fills the GPUs by the estimate: where a server measured more than it at its context, the
        # context is sized with that excess held back (a smaller one), not refused at every other start.
        estimated = planned(model.model_copy(update={"ctx": run.ctx}), claims)
        excess = {
            e.gpu: m.total_mib - e.total_mib
            for e, m in zip(estimated.devices, with_measured(estimated, run).devices, strict=True)
            if e.endpoint is None and m.total_mib > e.total_mib
        }
        if not excess:
            return with_measured(planned(model, claims), run)
        sized = planned(model, {**claims, **{g: claims.get(g, 0) + mib for g, mib in excess.items()}})
        plan = sized
        if sized.ctx == run.ctx:  # the measured context again: its measured terms against the GPUs' own room
            plan = with_measured(estimated, run).model_copy(update={"context": sized.context})
        said = ", ".join(f"{mib} MiB on GPU {gpu}" for gpu, mib in excess.items())
        why = f"ctx: max sized with {said} held back: a server measured that much above the estimate at ctx {run.ctx}"
        return plan.model_copy(update={"warnings": [*plan.warnings, why]})

    def place(
        self,
        name: str,
        model: ModelSettings,
        model_file: Path | None,
        samples: Sequence[GpuSample],
        claims: Mapping[int, int],
        remote: Remote = NO_REMOTE,
        measured: Measured = NOT_MEASURED,
    ) -> Placed:
        """The plan and placement of a start, or StartError with the numbers and the ways out."""
        plan = self.plan(name, model, model_file, samples, claims, remote, measured=measured)
        if not plan.fits:
            raise StartError(plan.reason or f"{name} does not fit", hint="; ".join(plan.suggestions) or None)
        return Placed(plan, self.placement(plan))

    def placement(self, plan: Plan) -> Placement:
        ctx = plan.ctx if plan.context is not None else None  # `ctx: max`: the server gets the chosen one
        if not plan.devices:
            return Placement(ctx=ctx)
        by_index = {g.index: g for g in self._identities}
        local = [d.gpu for d in plan.devices if d.endpoint is None]
        return Placement(
            gpu_layers=plan.gpu_layers,
            tensor_split=tuple(plan.tensor_split),
            devices=tuple(by_index[index] for index in local),
            claims_mib=plan.claims_mib,
            rpc=tuple(dict.fromkeys(d.endpoint for d in plan.devices if d.endpoint is not None)),
            ctx=ctx,
            split_mode=plan.split_mode,
        )

    def _check_gpu_refs(self, name: str, model: ModelSettings) -> None:
        """The model's `gpus:` must name GPUs that are there (by index or UUID)."""
        if model.gpus == "auto":
            return
        for ref in model.gpus:
            if not any(ref in (g.index, g.uuid) for g in self._identities):
                known = ", ".join(f"{g.index} ({g.uuid})" for g in self._identities) or "none"
                raise ConfigError(
                    f"models.{name}.gpus names GPU {ref!r}, which is not there", hint=f"GPUs seen: {known}"
                )


def freed(samples: Sequence[GpuSample], back_mib: Mapping[int, int]) -> list[GpuSample]:
    """The GPUs as they would be with some servers gone: the samples with the MiB per GPU those servers
    claimed (``back_mib``) free again."""
    return [
        s.model_copy(update={"memory_free_mib": min(s.memory_total_mib, s.memory_free_mib + back_mib[s.index])})
        if s.index in back_mib and s.memory_free_mib is not None and s.memory_total_mib is not None
        else s
        for s in samples
    ]
