"""The `launcher` command line. Errors are one sentence and a hint, never a traceback.

Exit codes: 0 done, 1 the thing asked for failed, 2 bad usage or bad configuration.

Commands that only read (`status`, `plan`, `gpus`, `doctor`, `logs`) never stop, start or record a
process: through the daemon when one answers, otherwise here with a planner or a GPU reading of their own
(launcher/local.py). The planner, the GPU libraries and the web framework are imported only by the
commands that use them, so a command that asks the daemon costs little more than Python's start.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from launcher.cli_output import (
    as_json,
    format_check,
    format_gpus,
    format_peer_models,
    format_plan,
    format_reload,
    format_statuses,
    plan_findings,
)
from launcher.cli_progress import DownloadBar, ProgressPrinter, all_ready, ready_report
from launcher.cli_upgrade import upgrade
from launcher.client import DaemonClient
from launcher.config import Settings
from launcher.config_daemon import DaemonSettings
from launcher.config_file import default_settings, load_daemon_settings, load_settings, read_token
from launcher.errors import ConfigError, ConflictError, LauncherError
from launcher.schema_gpus import GpuSample
from launcher.schema_instances import InstanceStatus
from launcher.schema_reload import RollReport
from launcher.statedir.layout import StateDir
from launcher.statedir.owner import read_owner, unanswered

# A tiny model is ready 50 ms after its start: look often at first, then every 100 ms (a request on the
# kept-alive connection costs about a millisecond).
_FIRST_POLL_S, _POLL_S = 0.01, 0.1
_DAEMON_START_TIMEOUT_S = 20.0


class Context:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._settings: Settings | None = None
        self._client: DaemonClient | None = None

    @property
    def json(self) -> bool:
        return bool(getattr(self.args, "json", False))

    def settings(self, required: bool = True) -> Settings:
        if self._settings is None or (required and self._settings.source is None):
            self._settings = load_settings(self.args.config, required=required)
        return self._settings

    def daemon_settings(self) -> DaemonSettings:
        """The `daemon:` section alone: enough to reach the daemon, and cheap (see load_daemon_settings)."""
        if self._settings is not None:
            return self._settings.daemon
        return load_daemon_settings(self.args.config)

    def client(self, daemon: DaemonSettings | None = None) -> DaemonClient:
        if self._client is None:
            daemon = daemon or self.daemon_settings()
            url = self.args.url or daemon.client_url
            token_file = daemon.token_file
            token = read_token(token_file) if token_file is not None and token_file.is_file() else None
            self._client = DaemonClient(url, token)
        return self._client

    def daemon(self) -> DaemonClient | None:
        """The client of a daemon that answers; None when no daemon owns this state directory. A daemon that
        owns it but does not answer is an error: nothing may be planned or started around it."""
        client = self.client()
        if client.reachable():
            return client
        owner = read_owner(self.daemon_settings().state_dir)
        if owner is not None:
            raise unanswered(owner, client.url)
        return None

    def required_daemon(self) -> DaemonClient:
        client = self.daemon()
        if client is None:
            raise LauncherError(
                f"no launcher daemon answers at {self.client().url}",
                hint="start it with `launcher serve` (or `launcher up NAME`), or pass --url",
            )
        return client


# ---- commands ---------------------------------------------------------------------------------------


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


def cmd_pull(ctx: Context) -> int:
    """Download a hub model's files into the Hugging Face cache, here (a daemon is not needed: the cache is
    the user's, shared with the daemon and every tool that uses it)."""
    from launcher.local import pull_here

    bar = DownloadBar(sys.stderr, quiet=ctx.json)
    try:
        _, paths = pull_here(ctx.settings(), ctx.args.name, bar.show)
    finally:
        bar.finish()
    parts = f" (+{len(paths) - 1} parts)" if len(paths) > 1 else ""
    if ctx.json:
        print(json.dumps({"model": ctx.args.name, "files": [str(p) for p in paths]}))
    else:
        print(f"{ctx.args.name}: in the Hugging Face cache at {paths[0]}{parts}")
    return 0


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
    settings.model(ctx.args.name.partition("@")[0])
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


def cmd_upgrade(ctx: Context) -> int:
    print(upgrade(ctx.required_daemon(), ctx.args.timeout))
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


def cmd_service(ctx: Context) -> int:
    from launcher.service import install_from_environment

    print(install_from_environment(user=ctx.args.user, print_only=ctx.args.print_only), end="")
    return 0


# ---- output -------------------------------------------------------------------------------------------


def _print_gpus(ctx: Context, gpus: Sequence[GpuSample]) -> None:
    if ctx.json:
        print(as_json(gpus), flush=True)
        return
    if ctx.args.watch:
        print("\x1b[H\x1b[2J", end="")  # redraw in place
    print(format_gpus(gpus), flush=True)


# ---- parser -------------------------------------------------------------------------------------------


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of lines (0 or more)")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    # Global options may stand before or after the command: SUPPRESS keeps a later default from
    # overwriting an earlier value.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="configuration file")
    common.add_argument("--url", default=argparse.SUPPRESS, help="the daemon's URL")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")

    parser = argparse.ArgumentParser(
        prog="launcher", parents=[common], description="Plan, start and supervise llama-server and Ollama."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable[[Context], int], help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help_text, description=help_text)
        sub.set_defaults(func=func)
        return sub

    serve = command("serve", cmd_serve, "run the daemon: API and supervision; starts autostart models")
    serve.add_argument("--no-autostart", action="store_true", help="start no model until asked")
    up = command("up", cmd_up, "start models and wait until each is ready")
    up.add_argument("names", nargs="+", metavar="NAME")
    up.add_argument("--detach", action="store_true", help="return once ready (starts a daemon if none runs)")
    down = command("down", cmd_down, "stop models")
    down.add_argument("names", nargs="+", metavar="NAME")
    restart = command("restart", cmd_restart, "restart a model and wait until it is ready (its replicas one at a time)")
    restart.add_argument("name", metavar="NAME")
    reload = command("reload", cmd_reload, "read the configuration again and apply the difference to the daemon")
    reload.add_argument("--dry-run", action="store_true", help="only show what would be done")
    upgrade = command("upgrade", cmd_upgrade, "run the installed program in the daemon, keeping its servers running")
    upgrade.add_argument("--timeout", type=float, default=120.0, metavar="S", help="how long to wait (default 120)")
    status = command("status", cmd_status, "table of instances; of one: its plan against what its server allocated")
    status.add_argument("name", nargs="?", metavar="NAME")
    plan = command("plan", cmd_plan, "dry run: the GPUs, MiB per GPU, split, command line; exit 1 if it does not fit")
    plan.add_argument("name", metavar="NAME")
    plan.add_argument(
        "--estimate", action="store_true", help="plan from the model's header alone, whatever earlier runs measured"
    )
    plan.add_argument("--forget", action="store_true", help="forget what the model's runs measured, and plan nothing")
    pull = command("pull", cmd_pull, "download a hub model's files (hf:...) into the Hugging Face cache")
    pull.add_argument("name", metavar="NAME")
    gpus = command("gpus", cmd_gpus, "table of GPUs: memory, temperature, utilisation, power, PCIe, instances")
    gpus.add_argument("--watch", action="store_true", help="redraw at every poll until Ctrl-C")
    command("doctor", cmd_doctor, "check the machine and the configuration; say how to fix each problem")
    logs_cmd = command("logs", cmd_logs, "a model's server log")
    logs_cmd.add_argument("name", metavar="NAME")
    logs_cmd.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs_cmd.add_argument("-n", "--lines", type=_count, default=100, help="lines from the end (default 100)")
    service = command("service", cmd_service, "run as a systemd service")
    actions = service.add_subparsers(dest="action", required=True, metavar="ACTION")
    install = actions.add_parser("install", help="write the systemd unit for this installation, print the commands")
    install.add_argument("--user", action="store_true", help="a user service (~/.config/systemd/user)")
    install.add_argument("--print", dest="print_only", action="store_true", help="only print the unit; write nothing")
    return parser


def main(argv: Sequence[str] | None = None) -> NoReturn:
    args = build_parser().parse_args(argv)
    for name, default in (("config", None), ("url", None), ("json", False)):
        if not hasattr(args, name):
            setattr(args, name, default)
    try:
        code = args.func(Context(args))
    except LauncherError as exc:
        print(f"launcher: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:  # `launcher gpus --json | head -1`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail again
        code = 0
    sys.exit(code)
