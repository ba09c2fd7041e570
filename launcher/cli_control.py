"""The `launcher` commands that change what runs: `serve`, `up` (through the daemon, a background daemon it
starts, or in the foreground), `down`, `restart` and `reload`, and the waiting until what they started is
ready."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

from launcher.cli_context import Context
from launcher.cli_output import as_json, format_reload, format_statuses
from launcher.cli_progress import ProgressPrinter, all_ready, ready_report
from launcher.client import DaemonClient
from launcher.config import Settings
from launcher.errors import ConfigError, ConflictError, LauncherError
from launcher.schema_instances import InstanceStatus
from launcher.schema_reload import RollReport
from launcher.statedir.layout import StateDir

# A tiny model is ready 50 ms after its start: look often at first, then every 100 ms (a request on the
# kept-alive connection costs about a millisecond).
_FIRST_POLL_S, _POLL_S = 0.01, 0.1
_DAEMON_START_TIMEOUT_S = 20.0


def cmd_serve(ctx: Context) -> int:
    from launcher import daemon  # FastAPI and uvicorn: imported only by the commands that serve
    from launcher.backends.options import check_server_args

    settings = ctx.settings()
    check_server_args(settings)
    daemon.serve(settings, autostart=not ctx.args.no_autostart)
    return 0


def _expand(names: list[str], statuses: list[InstanceStatus]) -> list[str]:
    """Instance names for ``names``: a model that runs as replicas stands for all of them."""
    result = []
    for name in names:
        members = [s.name for s in statuses if s.group == name and s.name != name]
        result += members or [name]
    return result


def cmd_up(ctx: Context) -> int:
    names: list[str] = ctx.args.names
    client = ctx.daemon()
    ad_hoc = [n for n in names if n.startswith("hf:")]
    if ad_hoc and (client is not None or ctx.args.detach):
        from launcher.ad_hoc import ad_hoc_names

        if ad_hoc_names(ctx.settings(required=False), ad_hoc):
            where = "a daemon runs" if client is not None else "--detach starts a daemon"
            raise ConfigError(
                f"{ad_hoc[0]} is not in the configuration, and {where} that serves only what the file names",
                hint="add it under `models:` (then `launcher reload`), or run it in the foreground with no daemon",
            )
    if client is None:
        settings = ctx.settings(required=not ad_hoc)
        if ad_hoc:
            from launcher.ad_hoc import with_ad_hoc

            settings, names = with_ad_hoc(settings, names)
            for ref, name in zip(ctx.args.names, names, strict=True):
                if ref != name:
                    print(f"{ref} runs as {name!r}", file=sys.stderr, flush=True)
        for name in names:
            settings.model(name)  # unknown names are bad usage, before anything starts
        from launcher.backends.options import check_server_args

        check_server_args(settings)  # as the daemon it starts (or becomes) would, before it starts
        if not ctx.args.detach:
            import asyncio

            from launcher import foreground  # the daemon in this process

            return asyncio.run(foreground.run(settings, names, as_json_output=ctx.json))
        client = _start_background_daemon(settings, ctx.client())
    names = _expand(names, client.instances())
    for name in names:
        with contextlib.suppress(ConflictError):  # already running: wait for it like any other
            client.act(name, "start")
    _report_ready(ctx, _wait_ready(ctx, client, names), through=client.url)
    return 0


def cmd_down(ctx: Context) -> int:
    client = ctx.required_daemon()
    names = _expand(ctx.args.names, client.instances())
    for name in names:
        with contextlib.suppress(ConflictError):  # already stopped: nothing to do, as systemctl stop
            client.act(name, "stop")
    statuses = [client.instance(name) for name in names]
    print(as_json(statuses) if ctx.json else format_statuses(statuses))
    return 0


def cmd_restart(ctx: Context) -> int:
    client = ctx.required_daemon()
    done = client.restart(ctx.args.name)
    if isinstance(done, RollReport):  # a model's replicas, one at a time: over when the answer comes
        print(as_json(done) if ctx.json else done.describe())
        return 0 if done.stopped_at is None else 1
    _report_ready(ctx, _wait_ready(ctx, client, [done.name]), through=client.url)
    return 0


def cmd_reload(ctx: Context) -> int:
    try:
        report = ctx.required_daemon().reload(ctx.args.dry_run)
    except ConfigError as exc:  # the file does not load: the daemon changed nothing; a refused act exits 1
        raise LauncherError(exc.message, exc.hint) from None
    print(as_json(report) if ctx.json else format_reload(report))
    if report.failures:  # applied, but a model did not come back: the caller must hear it (exit 1)
        failed = "; ".join(f"{i.name}: {i.reason}" for i in report.failures)
        print(
            f"launcher: the configuration was reloaded, but {len(report.failures)} change(s) failed: {failed}",
            file=sys.stderr,
        )
        return 1
    return 0


# ---- up: waiting, background daemon ------------------------------------------------------------------


def _wait_ready(ctx: Context, client: DaemonClient, names: list[str]) -> list[InstanceStatus]:
    """Show progress until every instance is ready; raise when one fails or stops."""
    printer = ProgressPrinter(sys.stderr, quiet=ctx.json)
    interval = _FIRST_POLL_S
    try:
        while True:
            statuses = [client.instance(name) for name in names]
            printer.update(statuses)
            if all_ready(statuses):
                return statuses
            time.sleep(interval)
            interval = min(interval * 1.5, _POLL_S)
    finally:
        printer.finish()


def _report_ready(ctx: Context, statuses: list[InstanceStatus], through: str) -> None:
    print(as_json(statuses) if ctx.json else ready_report(statuses, through, through_daemon=True))


def _start_background_daemon(settings: Settings, client: DaemonClient) -> DaemonClient:
    assert settings.source is not None
    log_path = StateDir(settings.daemon.state_dir).daemon_log
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "launcher", "--config", str(settings.source), "serve", "--no-autostart"]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + _DAEMON_START_TIMEOUT_S
    while not client.reachable():
        if proc.poll() is not None or time.monotonic() > deadline:
            from launcher.statedir import logs

            last = logs.last_line(log_path) or "no output"
            raise LauncherError(f"the background daemon did not start: {last}", hint=f"see {log_path}")
        time.sleep(0.1)
    print(f"started a background daemon (pid {proc.pid}) at {client.url}", file=sys.stderr)
    return client
