"""The planner against llama-server's own buffers for every architecture family of the corpus (issue 10).

Usage: .venv/bin/python -m bench.accuracy_arch [--arch NAME ...] [--quick] [--out FILE]

For each corpus entry (tests/archcorpus), at a short and a long context, with `-np 1` and with llama-server's
default slots, on 1, 2 and 3 devices (one `ggml-rpc-server` each): the launcher plans the model on simulated
GPUs it must all use (bench.realplan) and llama-server is started with the plan's own command line plus
`--rpc`; each device's planned weights, KV cache, compute and total are set beside what llama-server
reports with `-lv 4` (KV: the KV cache and the recurrent state, `RS buffer`, together) and beside `llama-fit-params
--fit-print on`'s estimate for the same placement. A row that cannot be measured says why (the planner's
error, llama-server's error line) instead of being dropped. Targets per device: KV within 2 %, total within
3 % or 32 MiB, whichever is larger (plans round each term up to whole MiB, so 1 MiB is allowed on KV).
"""

from __future__ import annotations

import argparse
import functools
import re
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from bench.realbuffers import Buffers, Reported, measure_argv, rpc_servers
from bench.realplan import PlannedLaunch, planned_launch
from launcher.backends import llama_log
from launcher.backends.llama_server import find_llama_server
from launcher.config_model import ModelSettings
from launcher.plan import verdict
from launcher.schema_plans import Plan
from tests import archcorpus

CONTEXTS = (2048, 32768)
SLOTS: tuple[int | None, ...] = (1, None)  # None: no -np, llama-server's default
DEVICES = (1, 2, 3)
PROJECTOR_ROW = "gemma3+mmproj"
# Options of llama-server's command line that llama-fit-params does not take (serving, logging, the projector).
_SERVER_ONLY = {"--host": 1, "--port": 1, "-lv": 1, "--fit": 1, "--mmproj": 1}
_FIT_LINE = re.compile(r"^(?P<device>RPC\d+|Host)\s+(?P<model>\d+)\s+(?P<context>\d+)\s+(?P<compute>\d+)\s*$", re.M)
_TMP_PATH = re.compile(r"/\S*/")
_ERROR_LINE = re.compile(r"^.*\b(E|error|failed|exception)\b.*$", re.M | re.I)


@dataclass(frozen=True)
class Case:
    arch: str
    ctx: int
    slots: int | None
    devices: int
    scale: int = 0  # the corpus scale measured (0: not yet)


@dataclass(frozen=True)
class DeviceRow:
    label: str  # "i/n (layers)"
    plan: Buffers
    real: Buffers
    fit: Buffers | None

    @property
    def kv_error_pct(self) -> float:
        plan, real = self.plan.kv + self.plan.state, self.real.kv + self.real.state
        return 0.0 if real == plan else 100 * (plan - real) / max(real, 1e-9)

    @property
    def total_error_mib(self) -> float:
        return self.plan.total - self.real.total

    @property
    def kv_off(self) -> float:
        """How far off KV is, in tolerances (over 1: outside the target)."""
        plan, real = self.plan.kv + self.plan.state, self.real.kv + self.real.state
        return abs(plan - real) / max(0.02 * real, 1.0)

    @property
    def total_off(self) -> float:
        return abs(self.total_error_mib) / max(0.03 * self.real.total, 32.0)

    @property
    def kv_ok(self) -> bool:
        return self.kv_off <= 1

    @property
    def total_ok(self) -> bool:
        return self.total_off <= 1


@dataclass(frozen=True)
class Outcome:
    case: Case
    rows: tuple[DeviceRow, ...] = ()
    failure: str = ""  # why nothing was measured
    # the running launcher's own check of the same log (launcher/plan/verdict.py): its findings; None: none made
    findings: tuple[str, ...] | None = None


def cases(archs: Sequence[str], quick: bool) -> list[Case]:
    devices = (1, 2) if quick else DEVICES
    return [Case(a, c, s, n) for a in archs for c in CONTEXTS for s in SLOTS for n in devices]


def settings_for(models: dict[str, Path], case: Case) -> ModelSettings:
    # -fa on: the RPC devices here are CPUs, whose `auto` says nothing about a GPU's (the planner's concern).
    args = ["-fa", "on", "-lv", "4"]
    if case.slots is not None:
        args += ["-np", str(case.slots)]
    if case.arch == PROJECTOR_ROW:
        args += ["--mmproj", str(models["mmproj"])]
        return ModelSettings(model=models["gemma3"], ctx=case.ctx, args=args)
    return ModelSettings(model=models[case.arch], ctx=case.ctx, args=args)


def first_error(log: str) -> str:
    found = _ERROR_LINE.findall(log)
    return (found[0] if found else log.strip().splitlines()[-1])[-160:].replace("|", "/")


def _fit_estimate(fit_params: Path, launch: PlannedLaunch, addresses: list[str]) -> dict[str, Buffers] | str:
    """llama-fit-params for the plan's own placement: its per-device estimate by RPC address, or its error."""
    argv, skip = [str(fit_params)], 0
    for arg in launch.argv[1:]:
        if skip:
            skip -= 1
        elif arg in _SERVER_ONLY:
            skip = _SERVER_ONLY[arg]
        else:
            argv.append(arg)
    argv += ["--rpc", ",".join(addresses), "--fit-print", "on"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    found = {m["device"]: m for m in _FIT_LINE.finditer(done.stdout)}
    if not found:
        return first_error(done.stderr + done.stdout)
    return {
        address: Buffers(float(m["model"]), float(m["context"]), float(m["compute"]))
        for i, address in enumerate(addresses)
        if (m := found.get(f"RPC{i}")) is not None
    }


def _launch(case: Case, corpus: Callable[[int], dict[str, Path]], scale: int) -> tuple[PlannedLaunch, int] | str:
    """The plan on exactly ``case.devices`` GPUs and the scale it took, or why there is none. A model whose
    compute buffers outweigh its weights when split (small widths at a long context) is widened, up to 4x:
    the weights grow with the square of the width, the masks not at all."""
    for wider in (scale, 2 * scale, 4 * scale):
        try:
            return planned_launch(settings_for(corpus(wider), case), case.devices), wider
        except AssertionError:  # no room sizes make that plan: try wider
            continue
        except Exception as error:  # the table reports a planner that cannot read a header, whatever it raised
            message = _TMP_PATH.sub("", str(error).splitlines()[0])  # the file's name is the row's
            return f"planner: {type(error).__name__}: {message}"
    return f"no {case.devices}-GPU plan up to --scale {4 * scale}"


def measure_case(case: Case, corpus: Callable[[int], dict[str, Path]], server: Path, scale: int) -> Outcome:
    launched = _launch(case, corpus, scale)
    if isinstance(launched, str):
        return Outcome(case, failure=launched)
    launch, used_scale = launched
    case = replace(case, scale=used_scale)
    with rpc_servers(server.parent, case.devices) as addresses:
        try:
            reported: Reported = measure_argv([*launch.argv, "--rpc", ",".join(addresses)], launch.port, launch.env)
        except RuntimeError as error:
            return Outcome(case, failure=f"llama-server: {first_error(str(error))}")
        fit = _fit_estimate(server.parent / "llama-fit-params", launch, addresses)
    rows = []
    for i, (device, address) in enumerate(zip(launch.placed.plan.devices, addresses, strict=True)):
        # llama-server reports the projector (--mmproj) with the weights of its device
        model_mib = device.weights_mib + device.projector_mib
        plan = Buffers(model_mib, device.kv_cache_mib, device.compute_mib, device.recurrent_mib)
        label = f"{i}/{case.devices} ({device.layers}{'+out' if device.output_layer else ''})"
        real = reported.devices.get(address, Buffers())
        rows.append(DeviceRow(label, plan, real, fit.get(address) if isinstance(fit, dict) else None))
    findings = _launcher_check(launch.placed.plan, addresses, reported.log, case.arch)
    failure = "" if isinstance(fit, dict) else f"llama-fit-params: {fit}"
    return Outcome(case, tuple(rows), failure=failure, findings=findings)


def _launcher_check(plan: Plan, addresses: list[str], log: str, model: str) -> tuple[str, ...]:
    """What the running launcher's check makes of this run: the plan's devices are simulated GPUs served
    by the rpc-servers at ``addresses``, in order, so they are named by those addresses as a peer's are."""
    remote = [d.model_copy(update={"endpoint": a}) for d, a in zip(plan.devices, addresses, strict=True)]
    checked = llama_log.check(plan.model_copy(update={"devices": remote}), llama_log.parse(log))
    return tuple(f.message for f in verdict.findings(model, checked)) + tuple(
        f"unmatched {u}" for u in checked.unmatched
    )


def _mib(value: float) -> str:
    return f"{value:.1f}"


def _cells(row: DeviceRow) -> str:
    real_kv = row.real.kv + row.real.state
    fit = row.fit
    fit_cells = f"{_mib(fit.kv)} | {_mib(fit.total)}" if fit else "- | -"
    pct = 100 * row.total_error_mib / row.real.total if row.real.total else 0.0
    marks = ("" if row.kv_ok else " KV!") + ("" if row.total_ok else " total!")
    return (
        f"{_mib(row.plan.model)} / {_mib(row.real.model)} | {_mib(row.plan.kv + row.plan.state)} / {_mib(real_kv)} "
        f"({row.kv_error_pct:+.1f}%) | {_mib(row.plan.compute)} / {_mib(row.real.compute)} | "
        f"{_mib(row.plan.total)} / {_mib(row.real.total)} ({pct:+.1f}%){marks} | {fit_cells}"
    )


HEADING = (
    "MiB per device, plan / llama-server -lv 4 (KV: KV cache + recurrent state); fit: llama-fit-params "
    "--fit-print on for the same placement (context, total). `!`: outside the target."
)


def table(outcomes: Sequence[Outcome], scale: int, heading: str = HEADING) -> str:
    lines = [
        heading,
        "",
        "| arch | ctx | -np | device | weights | KV | compute | total | fit KV | fit total |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    said: set[tuple[str, int, int | None, str]] = set()
    for o in outcomes:
        wider = f" (--scale {o.case.scale})" if o.case.scale and o.case.scale != scale else ""
        head = f"| {o.case.arch}{wider} | {o.case.ctx} | {o.case.slots or 'default'} |"
        group = (o.case.arch, o.case.ctx, o.case.slots, o.failure)
        if not o.rows and o.failure.startswith("planner"):  # the same for every device count: said once
            if group not in said:
                lines.append(f"{head} any | {o.failure} | | | | | |")
            said.add(group)
        elif not o.rows:
            lines.append(f"{head} {o.case.devices} dev: {o.failure} | | | | | | |")
        for row in o.rows:
            lines.append(f"{head} {row.label} | {_cells(row)} |")
        if o.rows and o.failure:
            lines.append(f"{head} | {o.failure} | | | | | |")
    return "\n".join(lines)


def launcher_checks(outcomes: Sequence[Outcome]) -> str:
    """The running launcher's check of every measured run: how many it found right, and each finding."""
    checked = [o for o in outcomes if o.findings is not None]
    lines = [
        f"The launcher's own check (launcher/plan/verdict.py) of the {len(checked)} measured runs: "
        f"{sum(1 for o in checked if not o.findings)} found within the tolerance."
    ]
    for o in checked:
        lines += [
            f"- {o.case.arch} ctx {o.case.ctx} -np {o.case.slots or 'default'}, {o.case.devices} dev: {f}"
            for f in o.findings or ()
        ]
    return "\n".join(lines)


def summary(outcomes: Sequence[Outcome]) -> str:
    measured = [(o, r) for o in outcomes for r in o.rows]
    if not measured:
        return "nothing measured"
    # ranked by how far outside its tolerance each row is, not by percent (sub-MiB KV would lead)
    worst_kv = max(measured, key=lambda m: m[1].kv_off)
    worst_total = max(measured, key=lambda m: m[1].total_off)
    worst = max(measured, key=lambda m: max(m[1].kv_off, m[1].total_off))
    off = sorted({o.case.arch for o, r in measured if not (r.kv_ok and r.total_ok)})
    unmeasured = sorted({f"{o.case.arch} ({o.failure})" for o in outcomes if not o.rows})

    def name(m: tuple[Outcome, DeviceRow]) -> str:
        o, r = m
        return f"{o.case.arch} ctx {o.case.ctx} -np {o.case.slots or 'default'} device {r.label}"

    def kv(row: DeviceRow) -> str:
        return f"{row.plan.kv + row.plan.state - row.real.kv - row.real.state:+.1f} MiB, {row.kv_off:.2f} x tolerance"

    def total(row: DeviceRow) -> str:
        pct = 100 * row.total_error_mib / row.real.total
        return f"{row.total_error_mib:+.1f} MiB ({pct:+.1f}%), {row.total_off:.2f} x tolerance"

    return "\n".join(
        [
            f"worst KV: {name(worst_kv)}: {kv(worst_kv[1])}",
            f"worst total: {name(worst_total)}: {total(worst_total[1])}",
            f"worst row: {name(worst)}: KV {kv(worst[1])}; total {total(worst[1])}",
            f"device rows within both targets: {sum(r.kv_ok and r.total_ok for _, r in measured)}/{len(measured)}",
            f"architectures with a row outside a target: {', '.join(off) or 'none'}",
            f"not measured: {'; '.join(unmeasured) or 'none'}",
        ]
    )


def arguments(doc: str | None, names: Sequence[str], quick: str, argv: list[str] | None) -> argparse.Namespace:
    """The accuracy benches' command line: --arch, --quick (``quick`` says what it leaves), --scale, --out."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--arch", action="append", choices=names, help="only these rows (repeatable)")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--scale", type=int, default=8, help="corpus widths (and most depths) times this")
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    return parser.parse_args(argv)


def corpus_in(tmp: Path) -> Callable[[int], dict[str, Path]]:
    """The corpus at a scale, written under ``tmp`` once per scale."""

    @functools.cache
    def corpus(scale: int) -> dict[str, Path]:
        (tmp / str(scale)).mkdir()
        return archcorpus.write_all(tmp / str(scale), scale=scale)

    return corpus


def main(argv: list[str] | None = None) -> None:
    names = (*(n for n in archcorpus.NAMES if n != "mmproj"), PROJECTOR_ROW)
    args = arguments(__doc__, names, "1 and 2 devices only", argv)
    server = find_llama_server(None)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = corpus_in(Path(tmp))
        outcomes = [measure_case(c, corpus, server, args.scale) for c in cases(args.arch or names, args.quick)]
    text = table(outcomes, args.scale) + "\n\n" + summary(outcomes) + "\n\n" + launcher_checks(outcomes)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
