"""`launcher doctor`: checks the machine and the configuration, and says how to fix each problem.

What it replaces are the troubleshooting sections of the guides users follow: GPUs the driver has but
the library does not see, PCIe links running below their width or generation, GPUs joined only
through the CPU, a llama-server built without GPU support, too few GPU layers, impossible splits.

This module gathers the findings (examine, run_doctor) and checks the supervision; the checks by area are
doctor_gpus.py, doctor_binaries.py, doctor_models.py and doctor_ports.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from launcher.backends.options import args_problems
from launcher.client import DaemonClient
from launcher.config import Settings
from launcher.doctor_binaries import binary_findings
from launcher.doctor_findings import Finding, Machine
from launcher.doctor_gpus import gpu_findings, link_findings, tensor_split_findings
from launcher.doctor_models import model_findings
from launcher.doctor_ports import ipv4_interfaces, port_findings, rpc_exposure
from launcher.errors import ConfigError, LauncherError
from launcher.local import local_gpus
from launcher.rpc.sockets import sockets_on
from launcher.schema_instances import InstanceStatus
from launcher.statedir.owner import read_owner, unanswered
from launcher.supervise.process import pdeathsig_prefix


def examine(settings: Settings, machine: Machine, daemon_ports: set[int]) -> list[Finding]:
    """Every finding, in the order a user would fix them."""
    return [
        *gpu_findings(machine),
        *link_findings(machine),
        *tensor_split_findings(settings, machine),
        *binary_findings(settings, machine),
        *(Finding("fail", "args", p.message, p.hint) for p in args_problems(settings)),
        *port_findings(settings, daemon_ports),
        *(f for name, model in settings.models.items() for f in model_findings(name, model, machine.gpus)),
    ]


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
    findings += rpc_exposure(settings, rpc_ports, listening, ipv4_interfaces())
    if as_json_output:
        print(json.dumps([vars(f) for f in findings], indent=2))
    else:
        for f in findings:
            print(f"{f.level.upper():4}  {f.check:12}  {f.message}")
            if f.fix and f.level != "ok":
                print(f"{'':4}  {'':12}  fix: {f.fix}")
    return 1 if any(f.level == "fail" for f in findings) else 0
