"""The `launcher` command line. Errors are one sentence and a hint, never a traceback.

Exit codes: 0 done, 1 the thing asked for failed, 2 bad usage or bad configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from launcher.client import DaemonClient
from launcher.config import Settings, default_settings, load_settings, read_token
from launcher.errors import ConfigError, ConflictError, LauncherError
from launcher.gpu.base import NoGpus
from launcher.gpu.sampler import Sampler, open_sampler
from launcher.gpu.types import GpuSample
from launcher.progress import ProgressPrinter, format_duration, format_plan, format_table
from launcher.supervise import logs
from launcher.supervise.instance import Event, State

_POLL_S = 0.1
_DAEMON_START_TIMEOUT_S = 20.0

Statuses = list[dict[str, Any]]


class Context:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._settings: Settings | None = None

    @property
    def json(self) -> bool:
        return bool(getattr(self.args, "json", False))

    def settings(self, required: bool = True) -> Settings:
        if self._settings is None or (required and self._settings.source is None):
            self._settings = load_settings(self.args.config, required=required)
        return self._settings

    def client(self, settings: Settings | None = None) -> DaemonClient:
        settings = settings or self.settings(required=False)
        url = self.args.url or f"http://{settings.daemon.host}:{settings.daemon.port}"
        token_file = settings.daemon.token_file
        token = read_token(token_file) if token_file is not None and token_file.is_file() else None
        return DaemonClient(url, token)


# ---- commands ---------------------------------------------------------------------------------------


def cmd_serve(ctx: Context) -> int:
    from launcher import daemon  # FastAPI and uvicorn: imported only by the command that serves

    daemon.serve(ctx.settings(), autostart=not ctx.args.no_autostart)
    return 0


def _expand(names: list[str], statuses: Statuses) -> list[str]:
    """Instance names for ``names``: a model that runs as replicas stands for all of them."""
    result = []
    for name in names:
        members = [s["name"] for s in statuses if s["group"] == name and s["name"] != name]
        result += members or [name]
    return result


def cmd_up(ctx: Context) -> int:
    names: list[str] = ctx.args.names
    client = ctx.client()
    if not client.reachable():
        settings = ctx.settings()
        for name in names:
            settings.model(name)  # unknown names are bad usage, before anything starts
        if not ctx.args.detach:
            return asyncio.run(_foreground(ctx, settings, names))
        _start_background_daemon(settings, client)
    names = _expand(names, client.instances())
    for name in names:
        with contextlib.suppress(ConflictError):  # already running: wait for it like any other
            client.act(name, "start")
    statuses = asyncio.run(_wait_ready(lambda: asyncio.to_thread(_fetch, client, names), ctx))
    _report_ready(ctx, statuses, through=client.url)
    return 0


def cmd_down(ctx: Context) -> int:
    client = ctx.client()
    names = _expand(ctx.args.names, client.instances())
    for name in names:
        with contextlib.suppress(ConflictError):  # already stopped: nothing to do, as systemctl stop
            client.act(name, "stop")
    _print_statuses(ctx, _fetch(client, names))
    return 0


def cmd_restart(ctx: Context) -> int:
    client = ctx.client()
    names = _expand([ctx.args.name], client.instances())
    for name in names:
        client.act(name, "restart")
    statuses = asyncio.run(_wait_ready(lambda: asyncio.to_thread(_fetch, client, names), ctx))
    _report_ready(ctx, statuses, through=client.url)
    return 0


def cmd_status(ctx: Context) -> int:
    _print_statuses(ctx, ctx.client().instances())
    return 0


def cmd_gpus(ctx: Context) -> int:
    client = ctx.client()
    interval = ctx.settings(required=False).gpus.poll_interval
    if client.reachable():
        while True:
            _print_gpus(ctx, client.gpus())
            if not ctx.args.watch:
                return 0
            time.sleep(interval)
    # No daemon: read the GPUs from this process (no instance runs on them through us).
    return asyncio.run(_gpus_here(ctx, interval))


async def _gpus_here(ctx: Context, interval: float) -> int:
    sampler, _reason = open_sampler(ctx.settings(required=False))
    await sampler.start()
    try:
        while True:
            _print_gpus(ctx, [s.model_dump(mode="json") for s in sampler.latest()])
            if not ctx.args.watch:
                return 0
            await asyncio.sleep(interval)
    finally:
        await sampler.stop()


def cmd_plan(ctx: Context) -> int:
    client = ctx.client()
    # Without a daemon: plan against the GPUs as read here, with no other instance running.
    here = not client.reachable()
    plan = asyncio.run(_plan_here(ctx.settings(), ctx.args.name)) if here else client.plan(ctx.args.name)
    if ctx.json:
        print(json.dumps(plan, indent=2))
    else:
        print(format_plan(ctx.args.name, plan))
    return 0 if plan["fits"] else 1


async def _plan_here(settings: Settings, name: str) -> dict[str, Any]:
    from launcher.daemon import open_manager

    manager, _reason = open_manager(settings, lambda _event: None)
    await manager.open()
    try:
        return manager.plan(name).model_dump(mode="json")
    finally:
        await manager.shutdown()


def cmd_doctor(ctx: Context) -> int:
    from launcher.doctor import Finding, Machine, examine

    findings: list[Finding] = []
    try:
        settings = ctx.settings()
    except ConfigError as exc:
        findings.append(Finding("fail", "config", exc.message, exc.hint or "fix the configuration"))
        settings = default_settings()  # the machine is still worth checking
    else:
        findings.append(Finding("ok", "config", f"{settings.source}: {len(settings.models)} models"))
    client = ctx.client(settings)
    daemon_ports: set[int] = set()
    if client.reachable():
        daemon_ports = {settings.daemon.port} | {i["port"] for i in client.instances() if i["port"]}
    try:
        sampler, reason = open_sampler(settings)
    except LauncherError as exc:
        findings.append(Finding("fail", "gpus", exc.message, exc.hint))
        sampler, reason = Sampler(NoGpus(), poll_interval_s=1), "none (the configured one cannot open)"
    samples = asyncio.run(_read_once(sampler))
    machine = Machine(gpus=samples, links=sampler.links, backend=reason, simulated=settings.gpus.backend == "sim")
    findings += examine(settings, machine, daemon_ports)
    if ctx.json:
        print(json.dumps([vars(f) for f in findings], indent=2))
    else:
        for f in findings:
            print(f"{f.level.upper():4}  {f.check:12}  {f.message}")
            if f.fix and f.level != "ok":
                print(f"{'':4}  {'':12}  fix: {f.fix}")
    return 1 if any(f.level == "fail" for f in findings) else 0


async def _read_once(sampler: Sampler) -> list[GpuSample]:
    await sampler.start()
    try:
        return sampler.latest()
    finally:
        await sampler.stop()


def cmd_logs(ctx: Context) -> int:
    client = ctx.client()
    if client.reachable():
        for line in client.log_lines(ctx.args.name, ctx.args.lines, ctx.args.follow):
            print(line, flush=True)
        return 0
    # No daemon: the log files are on this machine's disk.
    settings = ctx.settings()
    settings.model(ctx.args.name)
    path = settings.daemon.state_dir / "logs" / f"{ctx.args.name}.log"
    for line in logs.tail(path, ctx.args.lines):
        print(line)
    if ctx.args.follow:
        asyncio.run(_follow_file(path))
    return 0


async def _follow_file(path: Path) -> None:
    async for line in logs.follow(path):
        print(line, flush=True)


# ---- up: waiting, foreground supervision, background daemon ---------------------------------------


def _fetch(client: DaemonClient, names: list[str]) -> Statuses:
    return [client.instance(name) for name in names]


async def _wait_ready(fetch: Callable[[], Awaitable[Statuses]], ctx: Context) -> Statuses:
    """Show progress until every instance is ready; raise when one fails or stops."""
    printer = ProgressPrinter(sys.stderr, quiet=ctx.json)
    while True:
        statuses = await fetch()
        printer.update(statuses)
        for status in statuses:
            if status["state"] in (State.FAILED, State.STOPPED):
                printer.finish()
                reason = status["last_error"] or status["last_exit"] or status["state"]
                last = f"; last log line: {status['log_line']}" if status["log_line"] else ""
                raise LauncherError(
                    f"{status['name']} did not become ready: {reason}{last}",
                    hint=f"`launcher logs {status['name']}` shows the server's output",
                )
        if all(status["state"] == State.READY for status in statuses):
            printer.finish()
            return statuses
        await asyncio.sleep(_POLL_S)


def _report_ready(ctx: Context, statuses: Statuses, through: str | None) -> None:
    if ctx.json:
        print(json.dumps(statuses, indent=2))
        return
    for s in statuses:
        print(f"{s['name']} is ready at http://127.0.0.1:{s['port']} (pid {s['pid']})")
    if through:
        print(f"supervised by the daemon at {through}")
    first = statuses[0]
    url = f"http://127.0.0.1:{first['port']}"
    if first["backend"] == "ollama":
        body = json.dumps({"model": first["model"], "prompt": "Hello", "stream": False})
        print(f"try: curl -s {url}/api/generate -d '{body}'")
    else:
        print(f"try: curl -s {url}/completion -d '{json.dumps({'prompt': 'Hello', 'n_predict': 16})}'")


async def _foreground(ctx: Context, settings: Settings, names: list[str]) -> int:
    """Run the daemon in this process with ``names`` started, until Ctrl-C or SIGTERM stops it all."""
    # Imported here: FastAPI and uvicorn are needed only by the commands that serve.
    from launcher.daemon import Daemon, listen, open_manager

    sock, token = listen(settings)
    printing_events = False

    def on_event(event: Event) -> None:
        # Before ready the progress display speaks; after it, every crash and restart is told.
        if printing_events:
            print(f"{event.time} {event.describe()}", file=sys.stderr, flush=True)

    manager, _gpus = open_manager(settings, on_event)
    names = [member for name in names for member in manager.group(name)]
    api_up = asyncio.Event()
    daemon = Daemon(manager, sock, token, autostart=False, on_started=api_up.set)
    serving = asyncio.ensure_future(daemon.run())
    try:
        if not await _unless_stopped(asyncio.ensure_future(api_up.wait()), serving):
            return 130
        for name in names:
            await manager.start(name)

        async def fetch() -> Statuses:
            return [manager.get(n).status().model_dump(mode="json") for n in names]

        waiting = asyncio.ensure_future(_wait_ready(fetch, ctx))
        if not await _unless_stopped(waiting, serving):
            print("interrupted; stopped", file=sys.stderr)
            return 130
        _report_ready(ctx, waiting.result(), through=None)
        url = f"http://{settings.daemon.host}:{settings.daemon.port}"
        print(f"supervising in the foreground (API at {url}); Ctrl-C stops", file=sys.stderr, flush=True)
        printing_events = True
        await serving
        return 0
    finally:
        daemon.request_stop()
        await serving


async def _unless_stopped(work: asyncio.Future[Any], serving: asyncio.Future[None]) -> bool:
    """Wait for ``work`` unless serving ends first (a signal); True when the work finished."""
    await asyncio.wait([work, serving], return_when=asyncio.FIRST_COMPLETED)
    if work.done():
        work.result()  # its error, if any, is the command's
        return True
    work.cancel()
    serving.result()
    return False


def _start_background_daemon(settings: Settings, client: DaemonClient) -> None:
    assert settings.source is not None
    log_path = settings.daemon.state_dir / "daemon.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "launcher", "--config", str(settings.source), "serve", "--no-autostart"]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + _DAEMON_START_TIMEOUT_S
    while not client.reachable():
        if proc.poll() is not None or time.monotonic() > deadline:
            last = logs.last_line(log_path) or "no output"
            raise LauncherError(f"the background daemon did not start: {last}", hint=f"see {log_path}")
        time.sleep(0.1)
    print(f"started a background daemon (pid {proc.pid}) at {client.url}", file=sys.stderr)


# ---- output -------------------------------------------------------------------------------------------


def _print_statuses(ctx: Context, statuses: Statuses) -> None:
    if ctx.json:
        print(json.dumps(statuses, indent=2))
        return
    rows = [
        [
            s["name"],
            s["state"],
            s["pid"] or "-",
            s["port"] or "-",
            ",".join(str(g) for g in s["gpus"]) or "cpu",
            f"{s['vram_mib']} MiB" if s.get("vram_mib") else "-",
            format_duration(s["uptime_s"]),
            s["restarts"],
            s["last_exit"] or "-",
        ]
        for s in statuses
    ]
    print(format_table(["NAME", "STATE", "PID", "PORT", "GPUS", "VRAM", "UPTIME", "RESTARTS", "LAST EXIT"], rows))


def _print_gpus(ctx: Context, gpus: list[dict[str, Any]]) -> None:
    if ctx.json:
        print(json.dumps(gpus, indent=2), flush=True)
        return

    def value(v: Any, unit: str, digits: int = 0) -> str:
        return "-" if v is None else f"{v:.{digits}f}{unit}"

    def pcie(g: dict[str, Any]) -> str:
        if g["pcie_gen"] is None or g["pcie_width"] is None:
            return "-"
        now = f"gen{g['pcie_gen']} x{g['pcie_width']}"
        full = f"gen{g['pcie_gen_max']} x{g['pcie_width_max']}"
        return now if now == full or g["pcie_gen_max"] is None else f"{now} (max {full})"

    rows = [
        [
            g["index"],
            g["name"],
            f"{value(g['memory_used_mib'], '')}/{value(g['memory_total_mib'], ' MiB')}",
            value(g["memory_free_mib"], " MiB"),
            value(g["temperature_c"], " C"),
            value(g["utilization_pct"], "%"),
            value(g["power_w"], " W"),
            pcie(g),
            ",".join(g["instances"]) or "-",
            g["error"] or "",
        ]
        for g in gpus
    ]
    headers = ["GPU", "NAME", "MEMORY USED/TOTAL", "FREE", "TEMP", "UTIL", "POWER", "PCIE", "INSTANCES", "ERROR"]
    table = format_table(headers, rows) if gpus else "no GPU: servers run on the CPU"
    if ctx.args.watch:
        print("\x1b[H\x1b[2J", end="")  # redraw in place
    print(table, flush=True)


# ---- parser -------------------------------------------------------------------------------------------


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
    restart = command("restart", cmd_restart, "restart a model and wait until it is ready")
    restart.add_argument("name", metavar="NAME")
    command("status", cmd_status, "table of instances")
    plan = command("plan", cmd_plan, "dry run: the GPUs, MiB per GPU, split, command line; exit 1 if it does not fit")
    plan.add_argument("name", metavar="NAME")
    gpus = command("gpus", cmd_gpus, "table of GPUs: memory, temperature, utilisation, power, PCIe, instances")
    gpus.add_argument("--watch", action="store_true", help="redraw at every poll until Ctrl-C")
    command("doctor", cmd_doctor, "check the machine and the configuration; say how to fix each problem")
    logs_cmd = command("logs", cmd_logs, "a model's server log")
    logs_cmd.add_argument("name", metavar="NAME")
    logs_cmd.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs_cmd.add_argument("-n", "--lines", type=int, default=100, help="lines from the end (default 100)")
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
    sys.exit(code)
