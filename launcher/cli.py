"""The `launcher` command line: its parser, `main`, and the commands of no area (`pull`, `upgrade`,
`service`); those that change what runs are launcher/cli_control.py's, those that only read
launcher/cli_inspect.py's. Errors are one sentence and a hint, never a traceback.

Exit codes: 0 done, 1 the thing asked for failed, 2 bad usage or bad configuration.

The planner, the GPU libraries and the web framework are imported only by the commands that use them, so
a command that asks the daemon costs little more than Python's start.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from launcher.cli_context import Context
from launcher.cli_control import cmd_down, cmd_reload, cmd_restart, cmd_serve, cmd_up
from launcher.cli_inspect import cmd_doctor, cmd_gpus, cmd_logs, cmd_plan, cmd_status
from launcher.cli_progress import DownloadBar
from launcher.cli_upgrade import upgrade
from launcher.errors import LauncherError


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


def cmd_upgrade(ctx: Context) -> int:
    print(upgrade(ctx.required_daemon(), ctx.args.timeout))
    return 0


def cmd_service(ctx: Context) -> int:
    from launcher.service import install_from_environment

    print(install_from_environment(user=ctx.args.user, print_only=ctx.args.print_only), end="")
    return 0


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
