"""Why a server ended, in its own words: the error lines it wrote since it was started.

A server that cannot start says why on its way out (llama-server: `error: invalid argument: --no-mmap`,
`llama_model_load: error loading model: ...`, `couldn't bind HTTP server socket`; Ollama: `Error: listen
tcp ...`; a missing library: the loader's `error while loading shared libraries`; C++: `what(): ...`). The
launcher repeats that sentence wherever it reports the exit, instead of only the exit code. Pure: lines in
(`logs.lines_of_last_run`), a sentence out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# What marks a line as the reason: the words llama.cpp, Ollama (Go), the dynamic loader and the C++
# runtime use for a fatal error. Case-insensitive; `error` as a word, so `error_count=0` does not match.
_ERROR_LINE = re.compile(
    r"\berror\b|\bfailed to\b|what\(\):|\bpanic:|\bfatal\b|\bcouldn't\b|\bcannot\b|\bterminate called\b",
    re.IGNORECASE,
)
# llama.cpp's log prefix: the time since start (changes every run) and the level, E for an error.
_LLAMA_PREFIX = re.compile(r"^\d+\.\d+\.\d+\.\d+ ([A-Z]) ")
_KEPT_LINES = 3
_MAX_LINE_CHARS = 300


def server_error(run_lines: Sequence[str]) -> str | None:
    """What the server said went wrong: its first error line (the cause, as a rule) and its last ones (what
    it did about it), up to three distinct lines in their order, without llama.cpp's time prefix; its last
    lines when none is an error; None when it wrote nothing."""
    lines = [_without_prefix(line) for line in run_lines]
    errors = [text for text, level in lines if level == "E" or _ERROR_LINE.search(text)]
    chosen = _first_and_last(errors or [text for text, _ in lines][-_KEPT_LINES:], _KEPT_LINES)
    if not chosen:
        return None
    return "; ".join(_shorten(line) for line in chosen)


def _without_prefix(line: str) -> tuple[str, str | None]:
    """The line's text (whitespace runs made one space) and its llama.cpp level, if it has one."""
    found = _LLAMA_PREFIX.match(line)
    text = line[found.end() :] if found else line
    return " ".join(text.split()), found.group(1) if found else None


def _first_and_last(lines: Sequence[str], count: int) -> list[str]:
    distinct = list(dict.fromkeys(lines))
    return distinct if len(distinct) <= count else [distinct[0], *distinct[1 - count :]]


def _shorten(line: str) -> str:
    return line if len(line) <= _MAX_LINE_CHARS else line[: _MAX_LINE_CHARS - 3] + "..."
