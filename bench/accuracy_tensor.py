"""The planner's `-sm tensor` plans against what each RPC device really holds, for every architecture of the
corpus (issue 28): the tensor mode's accuracy table, as bench/accuracy_arch.py makes it for layers.

Usage: .venv/bin/python -m bench.accuracy_tensor [--arch NAME ...] [--quick] [--out FILE]

For each corpus entry (tests/archcorpus), at a short and a long context, on 2 and 3 devices (one logging
`ggml-rpc-server` each), with equal GPUs and with unequal ones (1 : 1.5 : 2, so the plan's `-ts` shares
differ): the launcher plans the model with `split_mode: tensor` on simulated, linked GPUs just large enough
that it needs all of them, and llama-server is started with the plan's own command line plus `--rpc`. Each
device's planned weights, KV cache, compute and total are set beside that rpc-server's own allocations
(GGML_RPC_DEBUG: exact; llama-server's `Meta()` lines give only the largest device's). An architecture the
plan refuses to split says why; one llama-server fails to load says so (the plan must refuse it instead).
Targets per device as for layers: KV within 2 %, total within 3 % or 32 MiB.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from bench.accuracy_arch import (
    CONTEXTS,
    Case,
    DeviceRow,
    Outcome,
    arguments,
    corpus_in,
    first_error,
    settings_for,
    summary,
    table,
)
from bench.realbuffers import Buffers, allocations, free_port, measure_argv, rpc_servers
from launcher.backends.llama_server import LlamaServerBackend, find_llama_server
from launcher.config_gpus import GpuSettings, SimGpu
from launcher.config_model import ModelSettings
from launcher.errors import StartError
from launcher.gpu.sampler import read_sample
from launcher.gpu.sim import SimBackend
from launcher.plan.estimate import MIB
from launcher.plan.planner import Placed, Planner
from tests import archcorpus

DEVICES = (2, 3)
UNEQUAL = (1.0, 1.5, 2.0)  # the GPUs' sizes relative to the first, for the rows with unequal shares
_LARGEST_MIB = 1 << 20
HEADING = (
    "MiB per device, plan / what its rpc-server allocated (GGML_RPC_DEBUG; compute: the rest, the Meta "
    "device's own few KiB included); `-ts`: the plan's share. No fit columns: llama-fit-params aborts for "
    "SPLIT_MODE_TENSOR. `!`: outside the target."
)


def _placed(model: ModelSettings, sizes_mib: Sequence[int]) -> Placed | None:
    settings = GpuSettings(
        backend="sim",
        margin_mib=0,
        overhead_mib=0,
        sim=[SimGpu(name=f"sim{i}", memory_mib=mib, link_group="nv") for i, mib in enumerate(sizes_mib)],
    )
    gpus = SimBackend(settings.sim)
    samples = [read_sample(gpus, gpu, processes=False) for gpu in gpus.identities()]
    assert isinstance(model.model, Path)
    try:
        return Planner(settings, gpus.identities(), gpus.links()).place("m", model, model.model, samples, {})
    except StartError:
        return None


def tensor_plan(model: ModelSettings, devices: int, unequal: bool) -> Placed | str:
    """The plan on the smallest GPUs of those relative sizes that hold the model (so it needs all of
    them), or why there is no tensor plan on ``devices`` GPUs."""
    relative = UNEQUAL[:devices] if unequal else (1.0,) * devices

    def sizes(mib: int) -> list[int]:
        return [int(mib * r) for r in relative]

    if _placed(model, sizes(_LARGEST_MIB)) is None:
        return "does not fit at all"
    low, high = 1, _LARGEST_MIB  # the smallest first GPU that holds it: bisection
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if _placed(model, sizes(middle)) is not None else (middle, high)
    placed = _placed(model, sizes(high))
    assert placed is not None
    # where layers fit on less than a tensor split needs (its compute buffer whole on every GPU), a little
    # more room, in steps of 2 %, up to where the model would need fewer GPUs
    for step in range(1, 30):
        if placed.plan.split_mode == "tensor" or len(placed.plan.devices) < devices:
            break
        larger = _placed(model, sizes(high * (50 + step) // 50))
        assert larger is not None
        if len(larger.plan.devices) < devices:
            break
        placed = larger
    if placed.plan.split_mode != "tensor":
        return f"plan: {placed.plan.split_reason}"
    if len(placed.plan.devices) != devices:
        return f"plan: tensor on {len(placed.plan.devices)} GPUs, not {devices}"
    return placed


def measure_case(case: Case, unequal: bool, corpus: Callable[[int], dict[str, Path]], server: Path) -> Outcome:
    model = settings_for(corpus(case.scale), case).model_copy(update={"split_mode": "tensor"})
    try:
        placed = tensor_plan(model, case.devices, unequal)
    except Exception as error:  # the table reports a planner that fails, whatever it raised
        placed = f"planner: {type(error).__name__}: {str(error).splitlines()[0]}"
    if isinstance(placed, str):
        return Outcome(case, failure=placed)
    port = free_port()
    spec = LlamaServerBackend(model).launch_spec(model, port, placed.placement)
    with tempfile.TemporaryDirectory() as logs, rpc_servers(server.parent, case.devices, logs=Path(logs)) as where:
        try:
            measure_argv([*spec.argv, "--rpc", ",".join(where)], port, spec.env)
        except RuntimeError as error:
            return Outcome(case, failure=f"llama-server: {first_error(str(error))}")
        real = allocations(Path(logs), case.devices)
    rows = []
    for i, (device, held, share) in enumerate(zip(placed.plan.devices, real, placed.plan.tensor_split, strict=True)):
        plan = Buffers(device.weights_mib, device.kv_cache_mib, device.compute_mib, device.recurrent_mib)
        compute_b = held.total_b - held.weights_b - held.kv_b  # the Meta device's own few KiB with compute
        measured = Buffers(held.weights_b / MIB, held.kv_b / MIB, compute_b / MIB)
        rows.append(DeviceRow(f"{i}/{case.devices} (-ts {share:g})", plan, measured, None))
    return Outcome(case, tuple(rows))


def main(argv: list[str] | None = None) -> None:
    names = tuple(n for n in archcorpus.NAMES if n != "mmproj")
    args = arguments(__doc__, names, "the short context and equal shares only", argv)
    server = find_llama_server(None)
    contexts = CONTEXTS[:1] if args.quick else CONTEXTS
    shares = (False,) if args.quick else (False, True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = corpus_in(Path(tmp))
        outcomes = [
            measure_case(Case(a, c, 1, n, args.scale), unequal, corpus, server)
            for a in args.arch or names
            for c in contexts
            for n in DEVICES
            for unequal in shares
        ]
    said = [replace(o, failure=o.failure.replace("|", "/")) for o in outcomes]
    text = table(said, args.scale, HEADING) + "\n\n" + summary(said)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
