"""The `launcher` commands that only read: `status`, `gpus`, `plan`, `doctor` and `logs`. None stops, starts
or records a process: through the daemon when one answers, otherwise here with a planner or a GPU reading
of their own (launcher/local.py)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from launcher import replicas
from launcher.cli_context import Context
from launcher.cli_output import (
    as_json,
    format_check,
    format_gpus,
    format_peer_models,
    format_plan,
    format_statuses,
    plan_findings,
)
from launcher.config_file import default_settings
from launcher.errors import ConfigError, LauncherError
from launcher.schema_gpus import GpuSample
from launcher.statedir.layout import StateDir


def cmd_status(ctx: Context) -> int:
    client = ctx.required_daemon()
    if ctx.args.name is not None:  # one instance: its row, then its plan against what its server allocated
        status = client.instance(ctx.args.name)
        print(as_json(status) if ctx.json else format_statuses([status]) + "\n\n" + format_check(status))
        return 0
    statuses = client.instances()
    if ctx.json:
        print(as_json(statuses))
        return 0
    print(format_statuses(statuses))
    health = client.health()
    for warning in health.warnings if health is not None else []:
        print(f"warning: {warning}")
    for line in plan_findings(statuses):
        print(line)
    remote = format_peer_models(client.peers())  # what the front door also routes to, on other hosts
    if remote:
        print("\n" + remote)
    return 0


def cmd_gpus(ctx: Context) -> int:
    interval = ctx.settings(required=False).gpus.poll_interval
    try:
        client = ctx.daemon()
    except LauncherError as exc:  # a daemon that does not answer: the GPUs can still be read here
        print(f"launcher: {exc.message}; reading the GPUs here", file=sys.stderr)
        client = None
    if client is not None:
        return _show_gpus(ctx, client.gpus, interval)
    from launcher.local import local_gpus

    with local_gpus(ctx.settings(required=False)) as gpus:
        return _show_gpus(ctx, gpus.read, interval)


def _show_gpus(ctx: Context, read: Callable[[], list[GpuSample]], interval_s: float) -> int:
    """Print the GPUs once, or with --watch at every poll until Ctrl-C."""
    while True:
        _print_gpus(ctx, read())
        if not ctx.args.watch:
            return 0
        time.sleep(interval_s)


def cmd_plan(ctx: Context) -> int:
    if ctx.args.forget:
        from launcher.local import forget_measurements

        forgotten = forget_measurements(ctx.settings(), ctx.args.name)
        print(f"{ctx.args.name}: {forgotten} measurements forgotten; its next plan is estimated")
        return 0
    client = ctx.daemon()
    if client is not None:
        plan = client.plan(ctx.args.name, ctx.args.estimate)
    else:  # no daemon: against the GPUs as read here, with no other instance running
        from launcher.local import plan_here

        plan = plan_here(ctx.settings(), ctx.args.name, ctx.args.estimate)
    print(as_json(plan) if ctx.json else format_plan(ctx.args.name, plan))
    return 0 if plan.fits else 1


def cmd_doctor(ctx: Context) -> int:
    from launcher.doctor import run_doctor

    problem: ConfigError | None = None
    try:
        settings = ctx.settings()
    except ConfigError as exc:
        settings, problem = default_settings(), exc  # the machine is still worth checking
    return run_doctor(settings, problem, ctx.client(settings.daemon), as_json_output=ctx.json)


def cmd_logs(ctx: Context) -> int:
    try:
        client = ctx.daemon()
    except LauncherError as exc:  # a daemon that does not answer: its log files are still on this disk
        print(f"launcher: {exc.message}; reading the log file here", file=sys.stderr)
        client = None
    if client is not None:
        for line in client.log_lines(ctx.args.name, ctx.args.lines, ctx.args.follow):
            print(line, flush=True)
        return 0
    from launcher.statedir import logs  # asyncio: only the commands that read log files need it

    settings = ctx.settings()
    settings.model(replicas.model_of(ctx.args.name))
    path = StateDir(settings.daemon.state_dir).server_log(ctx.args.name)
    for line in logs.tail(path, ctx.args.lines):
        print(line)
    if ctx.args.follow:
        import asyncio

        asyncio.run(_follow_file(path))
    return 0


async def _follow_file(path: Path) -> None:
    from launcher.statedir import logs

    async for line in logs.follow(path):
        print(line, flush=True)


# ---- output -------------------------------------------------------------------------------------------


def _print_gpus(ctx: Context, gpus: Sequence[GpuSample]) -> None:
    if ctx.json:
        print(as_json(gpus), flush=True)
        return
    if ctx.args.watch:
        print("\x1b[H\x1b[2J", end="")  # redraw in place
    print(format_gpus(gpus), flush=True)
