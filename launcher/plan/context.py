"""`ctx: max`: the largest context the model's GPUs hold beside the other instances' claims, in the steps
llama.cpp sizes a context in, between `ctx_min` and a cap. Pure: the placement is a function handed in.

llama.cpp pads n_ctx up to 256 cells; without a unified KV cache each of the n_seq_max streams gets
n_ctx / n_seq_max cells padded to 256 again, and n_ctx becomes that times n_seq_max (src/llama-context.cpp,
`llama_context::llama_context`: `GGML_PAD(cparams.n_ctx, 256)`, then `n_ctx_seq`). A context is therefore
chosen in steps of 256 cells per stream: any other -c costs the memory of the next step up anyway. That is
also how llama-server's own `--fit` shrinks a context it was not given (common/fit.cpp,
`common_params_fit_impl`: rounded down to `256 * n_streams`, between `--fit-ctx` (4096) and n_ctx_train per
stream); the launcher runs llama-server on GPUs with `--fit off`, so the plan's choice is the one it gets.

GPU count: `ctx_min` decides it. The model goes on the fewest GPUs where it fits at `ctx_min` (the planner's
usual rule: splitting costs speed), and the context grows as far as that many GPUs hold it; a larger context
never buys another GPU. A user who wants more GPUs for a longer context raises `ctx_min`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from launcher.plan.estimate import MIB, ModelShape, Runtime
from launcher.plan.layout import Layout, UsableGpu, layout
from launcher.schema_plans import ContextChoice
from launcher.server_args import CTX_CELLS

# llama-server's own floor for a context it chooses (`--fit-ctx`, common/arg.cpp `fit_params_min_ctx`): below
# it a chat with a system prompt and a few turns no longer fits, so a smaller default would only hide a box
# that is too full.
DEFAULT_CTX_MIN = 4096
CELLS = CTX_CELLS


def largest(fits: Callable[[int], bool], low: int, high: int) -> int | None:
    """The largest n in [low, high] with fits(n), for a ``fits`` that holds up to some n and not beyond;
    None when not even ``low`` fits. Bisection: fits(good) and not fits(bad) hold throughout, so the answer
    always fits and the next one up (when there is one) was seen not to."""
    if low > high or not fits(low):
        return None
    if fits(high):
        return high
    good, bad = low, high
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


Relay = Callable[[Layout, Runtime], Layout | None]
"""A chosen layout laid out again at another runtime on the same devices, fitting or not; None where the
split is planned afresh at each context instead."""


@dataclass(frozen=True)
class Sized:
    """The context chosen: the runtime with it, how it was chosen, the layout at it (None: even the floor
    does not fit whole on the GPUs), and a refusal when the bounds themselves leave no context."""

    runtime: Runtime
    choice: ContextChoice
    layout: Layout | None
    refusal: str | None = None


def streams(runtime: Runtime) -> int:
    """KV streams: one unified cache, or one per slot."""
    return 1 if runtime.kv_unified or runtime.parallel <= 1 else runtime.parallel


def size_context(
    shape: ModelShape,
    runtime: Runtime,
    ctx_min: int | None,
    ctx_max: int | None,
    place: Callable[[Runtime], Layout | None],
    gpus: Sequence[UsableGpu] | None,
    claims_mib: Mapping[int, int],
    overhead_b: int,
    relay: Relay = lambda chosen, runtime: None,
) -> Sized:
    """The largest context in steps of 256 cells per stream between ``ctx_min`` and ``ctx_max`` (per
    stream; defaults 4096 capped by, and the model's trained context) for which ``place`` finds a layout on
    no more GPUs than it takes at ``ctx_min`` (or ``relay`` lays out the split chosen there, a tensor
    split, on its GPUs). ``gpus``: those it may use, None without any (the model is in host memory: the
    cap). ``claims_mib`` are the other instances', named in the reason."""
    step = CELLS * streams(runtime)
    cap = ctx_max or shape.context_length
    cap_words = f"ctx_max {ctx_max}" if ctx_max else f"the model's trained context {shape.context_length}"
    high = max(1, cap // CELLS)  # in steps
    low = -(-ctx_min // CELLS) if ctx_min is not None else min(DEFAULT_CTX_MIN // CELLS, high)

    def at(k: int) -> Runtime:
        return dataclasses.replace(runtime, ctx=k * step)

    def choice(reason: str) -> ContextChoice:
        return ContextChoice(ctx_min=low * step, ctx_max=high * step, step=step, reason=reason)

    if low > high:
        why = f"ctx_min {ctx_min} is above the largest context ctx: max may choose, {cap_words}"
        return Sized(at(low), choice(why), None, refusal=why + (" (raise ctx_max)" if not ctx_max else ""))
    if gpus is None:
        why = f"ctx {high * step}: {cap_words}; no GPU to size it to (the model is in host memory)"
        return Sized(at(high), choice(why), place(at(high)))
    floor = place(at(low))
    if floor is None:
        why = f"not even ctx_min {low * step} fits the GPUs whole"
        return Sized(at(low), choice(why), None)
    count = len(floor.devices)
    found: dict[int, Layout | None] = {low: floor}

    def fits(k: int) -> bool:
        if k not in found:
            again = relay(floor, at(k))
            candidate = place(at(k)) if again is None else again if again.fits else None
            found[k] = candidate if candidate is not None and len(candidate.devices) <= count else None
        return found[k] is not None

    best = largest(fits, low, high)
    assert best is not None  # fits(low) holds
    chosen = found[best]
    assert chosen is not None
    where = _where(chosen)
    beside = _beside(chosen, claims_mib)
    if best == high:
        spare = min(d.usable_mib - -(-d.total_b // MIB) for d in chosen.devices)
        why = f"ctx {best * step}: {cap_words}, the cap, fits {where}{beside}, {spare} MiB to spare"
    else:
        fewest = f" (the fewest on which ctx_min {low * step} fits)" if count > 1 else ""
        why = f"ctx {best * step}: the largest that fits {where}{fewest}{beside}; " + _next_needs(
            shape, at(best + 1), chosen, gpus, overhead_b, relay
        )
    return Sized(at(best), choice(why), chosen)


def _where(chosen: Layout) -> str:
    names = [f"{d.host}:{d.gpu}" if d.endpoint else str(d.gpu) for d in chosen.devices]
    return f"GPU{'s' if len(names) > 1 else ''} {','.join(names)}"


def _beside(chosen: Layout, claims_mib: Mapping[int, int]) -> str:
    held = [
        f"{claims_mib[d.gpu]} MiB on GPU {d.gpu}" for d in chosen.devices if not d.endpoint and claims_mib.get(d.gpu)
    ]
    return f" beside the other instances' {', '.join(held)}" if held else ""


def _next_needs(
    shape: ModelShape, runtime: Runtime, chosen: Layout, gpus: Sequence[UsableGpu], overhead_b: int, relay: Relay
) -> str:
    """What the next step would take with the chosen split: the device it overflows, by how much."""
    by_key = {(g.endpoint, g.index): g for g in gpus}
    group = [by_key[(d.endpoint, d.gpu)] for d in chosen.devices]
    counts = [d.layers + int(d.output) for d in chosen.devices]
    loads = (relay(chosen, runtime) or layout(shape, runtime, group, counts, overhead_b)).devices
    worst = max(loads, key=lambda d: d.total_b - d.usable_mib * MIB)
    need_mib = -(-worst.total_b // MIB)
    if need_mib <= worst.usable_mib:  # no split of that many GPUs holds it, though this one nearly does
        return f"ctx {runtime.ctx} does not fit on {len(loads)} GPU{'s' if len(loads) > 1 else ''}"
    return (
        f"ctx {runtime.ctx} would need {need_mib} MiB on GPU {worst.gpu} with this split, "
        f"{worst.usable_mib} MiB usable there"
    )
