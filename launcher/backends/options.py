"""The options a llama.cpp server binary accepts, read from its own `--help`, and `args` checked against them.

llama.cpp renames and drops options between builds (`--no-mmap` became `--load-mode`): a server given an
option it no longer has prints `error: invalid argument` and exits at once, which the launcher would only
learn by starting it. Asking the binary itself is the one source that matches the build installed. The
answer is read once per binary and kept by its path, size and modification time; a binary that cannot be
asked (no `--help`, a stand-in, a crash) is not an error here: the server will say it at start.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
import re
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from launcher.backends import backend_for
from launcher.config import Settings
from launcher.config_model import ModelSettings
from launcher.errors import ConfigError

# The servers whose options are llama.cpp's, read from the same kind of help text.
_CHECKED_BACKENDS = ("llama-server", "rpc-server")
_HELP_TIMEOUT_S = 10.0
# An option as llama.cpp's help spells it: `-c,`, `--ctx-size`, `--no-mmap`, `-ngl`.
_OPTION = re.compile(r"--?[A-Za-z][\w.-]*")
_NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
# llama.cpp starts an entry at the margin, ggml-rpc-server two spaces in; descriptions go on 40 in.
_MAX_ENTRY_INDENT = 8
# Fewer options than this in what a binary printed means it was not a llama.cpp help text.
_MIN_OPTIONS = 3


@dataclass(frozen=True)
class ServerOptions:
    """What a server's help lists: each option with the description of its entry, and which options are
    followed by a value (`--api-key KEY`: the next word is the key, whatever it looks like)."""

    descriptions: Mapping[str, str]
    with_value: frozenset[str]


def options_in_help(help_text: str) -> ServerOptions:
    """Each option a llama.cpp help text lists, with the description of its entry.

    An entry starts near the left margin with its options and their value names (`-t,    --threads N`);
    the description follows after two or more spaces and goes on over the indented lines below it (which
    may start with `-` too: `- auto: mmap, unless ...`).
    """
    found: dict[str, str] = {}
    with_value: set[str] = set()
    current: list[str] = []
    for line in help_text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if indent >= _MAX_ENTRY_INDENT or not _OPTION.match(stripped):  # a description's next line, or none
            for name in current:
                found[name] = f"{found[name]} {stripped}".strip()
            current = current if stripped else []
            continue
        current, takes_value, description = _entry(stripped)
        for name in current:
            found[name] = description
        with_value.update(current if takes_value else [])
    return ServerOptions(found, frozenset(with_value))


def _entry(line: str) -> tuple[list[str], bool, str]:
    """The options of one help line, whether they take a value (a value name follows them), and the
    start of its description."""
    names: list[str] = []
    takes_value = False
    for match in re.finditer(r"(\s*)(\S+)", line):
        gap, token = match.group(1), match.group(2)
        option = _OPTION.fullmatch(token.rstrip(","))
        if option is not None:
            names.append(option.group(0))
        elif len(gap) >= 2 and names:  # past the option column
            return names, takes_value, line[match.start(2) :]
        elif names:
            takes_value = True  # `N`, `FNAME`, `[on|off|auto]`
    return names, takes_value, ""


@functools.cache
def _options_of(path: str, size: int, mtime_ns: int) -> ServerOptions | None:
    try:
        # A group of its own: a "binary" that ignores --help and starts serving (a wrapper script) goes
        # whole, children too, when it does not answer in time.
        with subprocess.Popen(
            [path, "--help"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        ) as asked:
            try:
                out, err = asked.communicate(timeout=_HELP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(asked.pid, signal.SIGKILL)
                asked.communicate()
                return None
    except OSError:
        return None
    options = options_in_help(out + "\n" + err)
    return options if asked.returncode == 0 and len(options.descriptions) >= _MIN_OPTIONS else None


def server_options(binary: Path) -> ServerOptions | None:
    """The options ``binary`` accepts with their descriptions, or None when it cannot be asked."""
    try:
        found = binary.stat()
    except OSError:
        return None
    return _options_of(str(binary), found.st_size, found.st_mtime_ns)


def options_given(args: Sequence[str], options: ServerOptions) -> Iterator[str]:
    """The options in a server's ``args``: `--name=value` counts as `--name`, and the word after an option
    that takes a value is that value (`--api-key -Xy`, `--temp -1e-3`, `-r "- User:"`), as is a number."""
    words = iter(args)
    for word in words:
        if not word.startswith("-") or word == "-" or _NEGATIVE_NUMBER.fullmatch(word):
            continue
        name, equals, _value = word.partition("=")
        yield name
        if not equals and name in options.with_value:
            next(words, None)


def unknown_option(args: Sequence[str], options: ServerOptions) -> str | None:
    """The first option in ``args`` that the server does not have."""
    return next((given for given in options_given(args, options) if given not in options.descriptions), None)


def closest_option(unknown: str, server: ServerOptions) -> str | None:
    """What the user most likely meant: the option whose description names the unknown one's word most
    often (`--load-mode` says `mmap` four times), else the nearest spelling."""
    options = server.descriptions
    word = re.compile(rf"(?<![\w-]){re.escape(unknown.lstrip('-').removeprefix('no-'))}(?![\w-])")
    mentions = {name: len(word.findall(text)) for name, text in options.items() if name.startswith("--")}
    most = max(mentions.values(), default=0)
    if most > 0:
        return next(name for name, count in mentions.items() if count == most)
    close = difflib.get_close_matches(unknown, [name for name in options if name.startswith("-")], n=1)
    return close[0] if close else None


def args_problem(name: str, model: ModelSettings, binary: Path) -> ConfigError | None:
    """The error for an option in ``model.args`` that ``binary`` does not have, or None."""
    options = server_options(binary)
    if options is None:
        return None
    unknown = unknown_option(model.args, options)
    if unknown is None:
        return None
    closest = closest_option(unknown, options)
    return ConfigError(
        f"models.{name}.args: {unknown} is not an option of this {model.backend} ({binary})"
        + (f"; did you mean {closest}?" if closest else ""),
        hint=f"`{binary} --help` lists the options it has",
    )


def args_problems(settings: Settings) -> Iterator[ConfigError]:
    """An error for each entry whose ``args`` have an option its server does not. A binary that cannot be
    found is left to the start, which says so."""
    for name, model in settings.models.items():
        if model.backend not in _CHECKED_BACKENDS or not model.args:
            continue
        try:
            binary = backend_for(model, settings.rpc).binary(model)
        except ConfigError:
            continue
        problem = args_problem(name, model, binary)
        if problem is not None:
            yield problem


def check_server_args(settings: Settings) -> None:
    """Raise the first of `args_problems`: what a daemon checks before it serves."""
    for problem in args_problems(settings):
        raise problem
