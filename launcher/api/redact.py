"""What a caller without the API token is shown of what may hold secrets. A model's configured `env` (an
HF_TOKEN, a remote service's key) and a llama-server key in its `args` are in its plan's environment and
command line; the servers' log lines may hold them too (Ollama prints its environment), and the prompts
served.

So without the token: the values of the configured environment and of the key options in the command
line read "<redacted>"; and where a token is configured, no log line is shown, nor the server's own words
in an instance's last error and exit events (on loopback without one,
nobody holds a token and every local caller may act anyway: log lines stay readable there; a web page is
kept out by launcher/api/origin.py).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from launcher.schema_instances import Event, InstanceStatus
from launcher.schema_plans import Plan

REDACTED = "<redacted>"
SERVER_WORDS_HIDDEN = "<the server's words: shown with the API token>"
# llama-server's options whose value is a secret.
_SECRET_OPTIONS = frozenset({"--api-key", "--hf-token", "-hft"})


def redacted_plan(plan: Plan, configured_env: Collection[str]) -> Plan:
    """``plan`` with the values of ``configured_env`` (the model's `env` keys) and of key options hidden."""
    env = {k: REDACTED if k in configured_env else v for k, v in plan.env.items()}
    command = [_hidden(part, plan.command[i - 1] if i else "") for i, part in enumerate(plan.command)]
    if env == plan.env and command == plan.command:
        return plan
    return plan.model_copy(update={"env": env, "command": command})


def without_log_lines(status: InstanceStatus, server_words: Iterable[str]) -> InstanceStatus:
    """``status`` less the server's log lines and its words (``server_words``: what its last exits said) in
    its last error and events (its plan is the placement alone: no environment, no command)."""
    words = list(server_words)
    return status.model_copy(
        update={
            "log_line": None,
            "log_tail": [],
            "last_error": None if status.last_error is None else without_words(status.last_error, words),
            "events": [without_server_words(event, words) for event in status.events],
        }
    )


def without_server_words(event: Event, server_words: Iterable[str]) -> Event:
    """``event`` with what a server said replaced by a note that the token shows it."""
    message = without_words(event.message, server_words)
    return event if message == event.message else event.model_copy(update={"message": message})


def without_words(text: str, words: Iterable[str]) -> str:
    for word in words:
        text = text.replace(word, SERVER_WORDS_HIDDEN)
    return text


def _hidden(part: str, before: str) -> str:
    """A command line's word, hidden when it is the value of a key option (`--api-key K`, `--api-key=K`)."""
    if before in _SECRET_OPTIONS:
        return REDACTED
    option, equals, _value = part.partition("=")
    return f"{option}={REDACTED}" if equals and option in _SECRET_OPTIONS else part
