"""What every `launcher` command is given: its parsed arguments, the settings (read once, when asked) and
the client of the daemon, with the rule for when a daemon must answer."""

from __future__ import annotations

import argparse

from launcher.client import DaemonClient
from launcher.config import Settings
from launcher.config_daemon import DaemonSettings
from launcher.config_file import load_daemon_settings, load_settings, read_token
from launcher.errors import LauncherError
from launcher.statedir.owner import read_owner, unanswered


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
