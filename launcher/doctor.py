"""`launcher doctor`: checks the machine and the configuration, and says how to fix each problem.

What it replaces are the troubleshooting sections of the guides users follow: GPUs the driver has but
the library does not see, PCIe links running below their width or generation, GPUs joined only
through the CPU, a llama-server built without GPU support, too few GPU layers, impossible splits.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil

from launcher.address import reach
from launcher.backends.llama_server import find_llama_server
from launcher.backends.ollama import OllamaBackend
from launcher.backends.options import args_problems
from launcher.backends.rpc_server import find_rpc_server
from launcher.client import DaemonClient
from launcher.config import Settings
from launcher.config_model import ModelSettings
from launcher.errors import ConfigError, LauncherError
from launcher.gpu.link_health import link_problems
from launcher.gpu.sysfs import amd_cards
from launcher.gpu.types import Link
from launcher.hub_ref import HubRef
from launcher.local import local_gpus
from launcher.plan.arch import rule_of
from launcher.plan.estimate import ModelShape
from launcher.plan.gguf import GgufFile, ModelFileError, read_gguf, regular_problem
from launcher.rpc.sockets import sockets_on
from launcher.schema_gpus import GpuSample
from launcher.schema_instances import InstanceStatus
from launcher.server_args import GPU_LAYERS, MMPROJ, TENSOR_SPLIT, arg_value, tensor_split
from launcher.statedir.owner import read_owner, unanswered
from launcher.supervise.ports import port_holder, port_is_free
from launcher.supervise.process import pdeathsig_prefix

Level = Literal["ok", "warn", "fail"]
_DEVICE_LINE = re.compile(r"^\s*(CUDA|ROCm|HIP|Vulkan|Metal|SYCL|MUSA|CANN)\d+:", re.MULTILINE)


@dataclass(frozen=True)
class Finding:
    level: Level
    check: str
    message: str
    fix: str | None = None


@dataclass(frozen=True)
class Machine:
    """What doctor looks at: the GPUs as read now, and where the driver's device files live."""

    gpus: list[GpuSample]
    links: dict[tuple[int, int], Link]
    backend: str  # which GPU backend and why
    simulated: bool
    dev_root: Path = Path("/dev")
    drm_root: Path = Path("/sys/class/drm")


def examine(settings: Settings, machine: Machine, daemon_ports: set[int]) -> list[Finding]:
    """Every finding, in the order a user would fix them."""
    return [
        *_gpus(machine),
        *_links(machine),
        *_tensor_splits(settings, machine),
        *_binaries(settings, machine),
        *(Finding("fail", "args", p.message, p.hint) for p in args_problems(settings)),
        *_ports(settings, daemon_ports),
        *(f for name, model in settings.models.items() for f in _model(name, model, machine.gpus)),
    ]


def _gpus(machine: Machine) -> Iterator[Finding]:
    yield Finding("ok", "gpus", f"GPU backend {machine.backend}")
    if not machine.simulated:
        nvidia = len([p for p in machine.dev_root.glob("nvidia[0-9]*") if p.name[6:].isdigit()])
        amd = len(amd_cards(machine.drm_root))
        for vendor, present in (("nvidia", nvidia), ("amd", amd)):
            seen = len([g for g in machine.gpus if g.vendor == vendor])
            if present > seen:
                library = "NVML (nvidia-ml-py)" if vendor == "nvidia" else "amdsmi (or sysfs)"
                yield Finding(
                    "fail",
                    "gpus",
                    f"the driver has {present} {vendor} GPU device(s) but {library} sees {seen}",
                    "reboot after a driver update (library/driver version mismatch), check `nvidia-smi` or "
                    "`rocm-smi`; for AMD install the launcher's amd extra (amdsmi)",
                )
    for gpu in machine.gpus:
        label = f"GPU {gpu.index} ({gpu.name})"
        if gpu.error is not None:
            yield Finding("fail", "gpus", f"{label} cannot be read: {gpu.error}", "check the card and driver")
            continue
        yield Finding("ok", "gpus", f"{label}: {gpu.memory_used_mib} of {gpu.memory_total_mib} MiB used")
        slow = []
        if gpu.pcie_width is not None and gpu.pcie_width_max is not None and gpu.pcie_width < gpu.pcie_width_max:
            slow.append(f"x{gpu.pcie_width} of x{gpu.pcie_width_max}")
        if gpu.pcie_gen is not None and gpu.pcie_gen_max is not None and gpu.pcie_gen < gpu.pcie_gen_max:
            slow.append(f"gen {gpu.pcie_gen} of {gpu.pcie_gen_max}")
        if slow:
            yield Finding(
                "warn",
                "pcie",
                f"{label} PCIe link runs at {' and '.join(slow)}",
                "idle cards lower their generation to save power: check again under load; a narrow width "
                "means a riser, a shared slot or a BIOS setting (reseat the card, check the slot's lanes)",
            )

        for problem in link_problems(gpu.links):
            yield Finding(
                "warn",
                "links",
                f"{label}: {problem}",
                "reseat the NVLink bridge (or check the board's xGMI), then `nvidia-smi nvlink --status`; a "
                "tensor split over this link runs at the speed of what is left",
            )


def _links(machine: Machine) -> Iterator[Finding]:
    for (i, j), link in sorted(machine.links.items()):
        if not link.direct:
            yield Finding(
                "warn",
                "topology",
                f"GPUs {i} and {j} are joined only through the CPU ({link.value})",
                "a tensor split across them sends every token's activations through system memory: prefer "
                "one GPU per model, or GPUs on one switch or NVLink",
            )


def _tensor_splits(settings: Settings, machine: Machine) -> Iterator[Finding]:
    """A model set to `split_mode: tensor` whose GPUs include a pair joined only through the CPU: every
    layer's partial results cross system memory (`auto` would take `layer` there)."""
    for name, model in settings.models.items():
        if model.split_mode != "tensor":
            continue
        usable = {g.index for g in machine.gpus if model.gpus == "auto" or g.index in model.gpus}
        slow = [pair for pair, link in sorted(machine.links.items()) if set(pair) <= usable and not link.direct]
        if slow:
            i, j = slow[0]
            yield Finding(
                "warn",
                "split",
                f"{name} has split_mode: tensor but GPUs {i} and {j} are joined only through the CPU",
                "split_mode: auto (a layer split there) or `gpus:` on NVLink-linked GPUs",
            )


def _binaries(settings: Settings, machine: Machine) -> Iterator[Finding]:
    llama_models = {n: m for n, m in settings.models.items() if m.backend == "llama-server"}
    binaries: dict[Path, list[str]] = {}
    candidates: dict[str, ModelSettings | None] = dict(llama_models) or {"(default)": None}
    for name, model in candidates.items():
        try:
            binary = find_llama_server(model.binary if model is not None else None)
        except LauncherError as exc:
            yield Finding("fail" if llama_models else "warn", "llama-server", exc.message, exc.hint)
            continue
        binaries.setdefault(binary, []).append(name)
    for binary, users in binaries.items():
        yield from _llama_server_devices(binary, users, machine)
    ollama_models = [n for n, m in settings.models.items() if m.backend == "ollama"]
    ollama = shutil.which("ollama")
    if ollama is None:
        level: Level = "fail" if ollama_models else "warn"
        needed = f" (needed by {', '.join(ollama_models)})" if ollama_models else ""
        yield Finding(level, "ollama", f"no ollama binary on PATH{needed}", "install Ollama, or set `binary:`")
    else:
        yield Finding("ok", "ollama", f"ollama at {ollama}")
    for name, model in settings.models.items():
        if model.backend == "rpc-server":
            try:
                yield Finding("ok", "rpc-server", f"{name}: {find_rpc_server(model.binary)}")
            except LauncherError as exc:
                yield Finding("fail", "rpc-server", f"{name}: {exc.message}", exc.hint)


def _llama_server_devices(binary: Path, users: list[str], machine: Machine) -> Iterator[Finding]:
    try:
        listed = subprocess.run(
            [str(binary), "--list-devices"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        yield Finding("fail", "llama-server", f"{binary} does not run: {exc}", "rebuild it or set `binary:`")
        return
    devices = _DEVICE_LINE.findall(listed.stdout + listed.stderr)
    used_by = ", ".join(users)
    if devices:
        yield Finding("ok", "llama-server", f"{binary} ({used_by}) sees {len(devices)} GPU device(s)")
    elif machine.gpus and not machine.simulated:
        yield Finding(
            "fail",
            "llama-server",
            f"{binary} ({used_by}) was built without GPU support: it lists no GPU device",
            "build llama.cpp with -DGGML_CUDA=ON (NVIDIA) or -DGGML_HIP=ON (AMD) and set `binary:`",
        )
    else:
        yield Finding("ok", "llama-server", f"{binary} ({used_by}) is a CPU build; no real GPU here to use")


def _ports(settings: Settings, daemon_ports: set[int]) -> Iterator[Finding]:
    wanted = {settings.daemon.port: "the daemon (daemon.port)"}
    wanted |= {m.port: f"models.{n}.port" for n, m in settings.models.items() if isinstance(m.port, int)}
    for port, user in sorted(wanted.items()):
        if port in daemon_ports or port_is_free(port):
            continue
        holder = port_holder(port)
        yield Finding(
            "warn",
            "ports",
            f"port {port} for {user} is in use" + (f" by {holder}" if holder else ""),
            "stop that program or choose another port (port: auto picks a free one)",
        )


def _model(name: str, model: ModelSettings, gpus: list[GpuSample]) -> Iterator[Finding]:
    where = f"models.{name}"
    if model.backend == "rpc-server":  # no model of its own: its binary and address are checked apart
        return
    if model.backend == "ollama":
        backend = OllamaBackend(model)
        try:
            backend.check_model(model, name)
        except LauncherError as exc:
            yield Finding("fail", "models", exc.message, exc.hint)
        blob = backend.model_file(model)
        if blob is not None:
            yield from _read_header(where, blob, "model file")[1]
        return
    if isinstance(model.model, HubRef):  # nothing local to read until it is downloaded
        yield Finding("ok", "models", f"{where}.model: {model.model} on the hub; `launcher plan {name}` plans it")
        return
    problem = "does not exist" if model.model is None else regular_problem(model.model)
    if model.model is None or problem is not None:
        yield Finding("fail", "models", f"{where}.model {model.model} {problem}", "fix the path")
        return
    # The configuration checked -ts and -ngl when it was loaded: their values parse, and a split has a
    # positive proportion (as tensor_split must).
    split_arg = arg_value(model.args, *TENSOR_SPLIT)
    split = tensor_split(split_arg) if split_arg is not None else model.tensor_split
    count = len(model.gpus) if isinstance(model.gpus, list) else len(gpus)
    if isinstance(split, list) and len(split) > count:
        yield Finding(
            "fail",
            "split",
            f"{where}: the tensor split has {len(split)} entries for {count} GPU(s)",
            "one proportion per GPU; they need not sum to 1 (llama.cpp normalises them)",
        )
    projector = arg_value(model.args, *MMPROJ)
    if projector is not None:
        yield from _read_header(where, Path(projector), "the --mmproj file")[1]
    found, problems = _read_header(where, model.model, "model file")
    yield from problems
    if found is None:
        return
    architecture, layers = found.architecture, int(found.arch("block_count"))
    if architecture and rule_of(architecture) is None:
        yield Finding(
            "warn",
            "architecture",
            f"{where}: the planner has no rule for architecture {architecture!r}; it plans it as a plain "
            "transformer (full attention and a KV cache on every layer)",
            "check `launcher plan` against llama-server's `-lv 4` buffer sizes before relying on it",
        )
    layers_arg = arg_value(model.args, *GPU_LAYERS)
    if layers_arg is not None and layers_arg not in ("auto", "all") and gpus:
        asked = int(layers_arg)
        if asked < layers + 1:
            yield Finding(
                "warn",
                "layers",
                f"{where}.args: -ngl {asked} puts {min(asked, layers)} of {layers} layers (+ output) on the GPUs; "
                "the rest run on the CPU, many times slower",
                "drop -ngl from args: the launcher offloads every layer that fits and says when they do not",
            )


def _read_header(where: str, path: Path, what: str) -> tuple[GgufFile | None, list[Finding]]:
    """The header of ``path`` as the planner reads it (None when it cannot: a FIFO, a bad or cut header,
    a value out of bounds), and what is wrong with the file: that, or tensor data that is not all there
    (a file cut short: an unfinished download)."""
    try:
        found = read_gguf(path, what)
        if what == "model file":
            ModelShape.of(found)
    except ModelFileError as exc:
        return None, [Finding("fail", "models", f"{where}: {exc.message}", exc.hint or "fix or replace the file")]
    if found.data_end > found.file_bytes:
        cut = Finding(
            "fail",
            "models",
            f"{where}: {what} {path} is cut short: its tensor data ends at byte {found.data_end} but the file "
            f"has {found.file_bytes} bytes",
            "an unfinished download or copy: fetch or copy it again",
        )
        return found, [cut]
    return found, []


def rpc_exposure(
    settings: Settings, ports: Mapping[int, str], listening: Mapping[int, list[str]], interfaces: list[str]
) -> Iterator[Finding]:
    """An RPC server has no authentication: warn about a public rpc.listen (allowed by rpc.allow_public)
    and about each rpc-server port (``ports``: port -> its instance) that listens on a public address, or
    on all of them (0.0.0.0) while this host has a public one among its ``interfaces``."""
    listen = settings.rpc.listen
    if reach(listen) in ("public", "wildcard"):
        yield Finding(
            "warn",
            "rpc",
            f"rpc.listen {listen} is not a loopback or private address (rpc.allow_public is set): anyone who "
            "reaches it can use the GPUs the rpc-servers lend and read what is on them",
            "bind a private address and reach other hosts through a VPN or a private network",
        )
    public_interfaces = [a for a in interfaces if reach(a) == "public"]
    for port, name in sorted(ports.items()):
        exposed = sorted(
            {
                reached
                for address in listening.get(port, [])
                for reached in (public_interfaces if reach(address) == "wildcard" else [address])
                if reach(reached) == "public"
            }
        )
        if exposed:
            yield Finding(
                "warn",
                "rpc",
                f"the rpc-server port {port} ({name}) is reachable on the public address {', '.join(exposed)}",
                "set rpc.listen to a loopback or private address, or firewall the port",
            )


def _ipv4_interfaces() -> list[str]:
    return [a.address for nic in psutil.net_if_addrs().values() for a in nic if a.family == socket.AF_INET]


def _supervision(settings: Settings, client: DaemonClient, daemon_answers: bool) -> Iterator[Finding]:
    if not pdeathsig_prefix():
        yield Finding(
            "warn",
            "supervision",
            "no setpriv with --pdeathsig (util-linux 2.33 or later): servers will not die with a daemon killed "
            "by SIGKILL",
            "install util-linux; until then the next daemon start stops what a killed one left running",
        )
    owner = read_owner(settings.daemon.state_dir)
    if owner is not None and not daemon_answers:
        error = unanswered(owner, client.url)
        yield Finding("fail", "daemon", error.message, error.hint)


def _plan_checks(statuses: list[InstanceStatus]) -> Iterator[Finding]:
    """Running servers whose plan was off by more than the tolerance (launcher/plan/verdict.py): the
    server took more than planned (warn: other instances were told less) or left memory unused (ok)."""
    for status in statuses:
        for found in status.actual.findings if status.actual is not None else []:
            fix = f"the next start of {status.group} plans from what was measured (`launcher status {status.name}`)"
            yield Finding("warn" if found.over else "ok", "plan", found.message, fix)


def run_doctor(settings: Settings, problem: ConfigError | None, client: DaemonClient, *, as_json_output: bool) -> int:
    """`launcher doctor`: print the findings; 1 when something fails. Reads only: the GPUs are opened
    here and closed, the daemon (if one answers) is asked for its ports."""
    if problem is not None:
        findings = [Finding("fail", "config", problem.message, problem.hint or "fix the configuration")]
    else:
        findings = [Finding("ok", "config", f"{settings.source}: {len(settings.models)} models")]
    health = client.health()
    daemon_answers = health is not None
    daemon_ports: set[int] = set()
    # rpc-server ports: the configured ones, and those the daemon's instances run on.
    rpc_ports = {m.port: n for n, m in settings.models.items() if m.backend == "rpc-server" and isinstance(m.port, int)}
    if daemon_answers:
        try:
            statuses = client.instances()
            findings += _plan_checks(statuses)
            daemon_ports = {settings.daemon.port} | {i.port for i in statuses if i.port}
            rpc_ports |= {i.port: i.name for i in statuses if i.backend == "rpc-server" and i.port}
        except LauncherError as exc:  # it answers /health but will not show its instances (a read token)
            findings.append(
                Finding("warn", "daemon", f"the daemon at {client.url} answers, but: {exc.message}", exc.hint)
            )
            daemon_ports = {settings.daemon.port}
    findings += _supervision(settings, client, daemon_answers)
    for warning in health.warnings if health is not None else []:  # a lost server, a state dir it cannot write
        findings.append(Finding("warn", "daemon", warning, "see the daemon's events (`launcher status`, its log)"))
    try:
        with local_gpus(settings) as gpus:
            machine = Machine(
                gpus=gpus.read(),
                links=gpus.backend.links(),
                backend=gpus.description,
                simulated=settings.gpus.backend == "sim",
            )
    except LauncherError as exc:
        findings.append(Finding("fail", "gpus", exc.message, exc.hint))
        machine = Machine(gpus=[], links={}, backend="none (the configured one cannot open)", simulated=False)
    findings += examine(settings, machine, daemon_ports)
    listening = {port: sockets_on(port).listening for port in rpc_ports}
    findings += rpc_exposure(settings, rpc_ports, listening, _ipv4_interfaces())
    if as_json_output:
        print(json.dumps([vars(f) for f in findings], indent=2))
    else:
        for f in findings:
            print(f"{f.level.upper():4}  {f.check:12}  {f.message}")
            if f.fix and f.level != "ok":
                print(f"{'':4}  {'':12}  fix: {f.fix}")
    return 1 if any(f.level == "fail" for f in findings) else 0
