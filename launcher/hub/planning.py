"""The plan of a hub model from its files' headers, before any of its weights are fetched: the repo listed
at the commit its revision resolves to, each file's header read (headers.py), the model's shape handed to
the planner. A reference without a quant (`hf:ORG/REPO`) plans every quant of the repo and takes the
largest that fits (`choose`, pure); the plan carries the table of them all. A quant fits with the model's
`ctx`, or with `ctx: max` at its `ctx_min` (the planner's verdict then): the largest quant that holds the
floor wins, and gets the largest context its room allows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from launcher.config_model import ModelSettings
from launcher.errors import ConfigError
from launcher.hub.cache import cached_file
from launcher.hub.headers import Header, HubReader
from launcher.hub.repo import HubModel, Listing, selected
from launcher.hub_ref import HubRef
from launcher.plan.estimate import ModelShape
from launcher.plan.gguf import ModelFileError, assemble, split_siblings
from launcher.plan.planner import Planner
from launcher.plan.remote import NO_REMOTE, Remote
from launcher.schema_gpus import GpuSample
from launcher.schema_plans import HubPlan, Plan, QuantPlan


def choose(quants: Sequence[QuantPlan]) -> int | None:
    """The index of the largest quant that fits (the best quality the GPUs take), None when none does."""
    fitting = [i for i, q in enumerate(quants) if q.fits]
    return max(fitting, key=lambda i: quants[i].size_bytes) if fitting else None


def model_shape(listing: Listing, model: HubModel, headers: Sequence[Header]) -> ModelShape:
    """The shape of ``model`` from its files' headers; its split as the first file's metadata says, or
    refused (a part missing from the repo, or named otherwise)."""
    first = Path(f"hf:{listing.repo}/{model.files[0].path}")
    siblings = split_siblings(first, headers[0].part[0])
    expected = [f"hf:{listing.repo}/{f.path}" for f in model.files[1:]]
    if [str(s) for s in siblings] != expected:
        raise ModelFileError(
            f"{first} is split in {len(siblings) + 1} files by its header, but the repo has {len(model.files)} "
            "of its parts"
        )
    return ModelShape.of(assemble(first, headers[0].part, [h.part for h in headers[1:]]))


def plan_from_hub(
    planner: Planner,
    reader: HubReader,
    name: str,
    model: ModelSettings,
    samples: Sequence[GpuSample],
    claims: Mapping[int, int],
    remote: Remote = NO_REMOTE,
) -> Plan:
    """The plan of the hub model ``model`` (its chosen quant's, or the smallest's when none fits), with the
    headers' bytes and, for a reference without a quant, every quant's verdict."""
    ref = model.model
    if not isinstance(ref, HubRef):
        raise ConfigError(f"models.{name}.model is not a hub model")
    revision = model.revision or "main"
    listing = reader.listing(ref.repo, model.revision)
    candidates = selected(ref, listing, revision)
    plans: list[Plan] = []
    quants: list[QuantPlan] = []
    headers: list[list[Header]] = []
    projector, projector_headers = _projector(reader, model)
    for candidate in candidates:
        read = [reader.header(listing, f) for f in candidate.files]
        shape = model_shape(listing, candidate, read)
        plan = planner.plan(name, model, shape, samples, claims, remote, projector)
        headers.append(read + projector_headers)
        plans.append(plan)
        quants.append(
            QuantPlan(
                quant=candidate.quant,
                files=[f.path for f in candidate.files],
                size_bytes=candidate.size_bytes,
                fits=plan.fits,
                reason=plan.reason,
                ctx=plan.ctx,
            )
        )
    chosen = choose(quants)
    at = 0 if chosen is None else chosen  # none fits: the smallest, to say what it needs
    if len(candidates) > 1:
        quants[at] = quants[at].model_copy(update={"chosen": chosen is not None})
    plan = plans[at]
    if chosen is None and len(candidates) > 1:
        plan = plan.model_copy(
            update={"reason": f"no quant of {ref.repo} fits; the smallest, {candidates[0].name}: {plan.reason}"}
        )
    hub = HubPlan(
        reference=str(ref),
        repo=ref.repo,
        revision=revision,
        commit=listing.commit,
        files=quants[at].files,
        size_bytes=candidates[at].size_bytes,
        header_bytes=sum(h.header_bytes for read in headers for h in read),
        fetched_bytes=sum(h.fetched_bytes for read in headers for h in read),
        quants=quants if len(candidates) > 1 or (ref.file is None and ref.quant is None) else [],
    )
    return plan.model_copy(update={"hub": hub})


def _projector(reader: HubReader, model: ModelSettings) -> tuple[int | None, list[Header]]:
    """The weights of a hub projector (`mmproj: hf:...`) not in the cache, from its header, and the header
    read; (None, []) when the planner reads it from its file (or there is none)."""
    ref = model.mmproj
    if not isinstance(ref, HubRef) or ref.file is None or cached_file(ref, None) is not None:
        return None, []
    listing = reader.listing(ref.repo, None)
    found = [f for f in listing.files if f.path == ref.file]
    if not found:
        raise ConfigError(f"mmproj: {ref.file} is not a GGUF file in {ref.repo} at main")
    header = reader.header(listing, found[0])
    tensors = assemble(Path(str(ref)), header.part, []).tensors
    return sum(t.n_bytes for t in tensors), [header]
