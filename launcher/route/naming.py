"""Answers that name the model the client asked for: a server names itself in each answer (llama-server
its file's path, `/models/x.gguf`; Ollama its own tag), which leaks the host's layout and confuses clients
that compare it with what they sent. The front door rewrites the `model` field, and only it, to the name
or alias of the request: in a plain JSON answer, and in each event (SSE `data:` line, NDJSON line) of a
stream as it passes, with no wait (an event is rewritten when its line is complete, which is where a
server's chunks end). A body that is not JSON, or compressed, passes through unchanged.
"""

from __future__ import annotations

import json
import re
from typing import Any

# A JSON string or a bracket: the depth of a position in a JSON text is counted over these, so that a
# bracket or a `"model"` within a string is never taken for structure.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # unrolled: a run of plain bytes at a time
_TOKEN = re.compile(_STRING.pattern + rb"|[\[\]{}]")
_KEY = b'"model"'
_STRING_VALUE = re.compile(rb"\s*:\s*" + _STRING.pattern)
_LINE_MAX_BYTES = 1024 * 1024  # a line longer than this, still without its end, passes on unchanged


def member(name: str) -> bytes:
    """The `model` member that names ``name``, as JSON."""
    return b'"model":' + json.dumps(name, ensure_ascii=False).encode()


def top_level_member(text: bytes) -> tuple[int, int] | None:
    """Where the `"model": "..."` member of the object ``text`` holds is (its last, as a JSON parser reads
    duplicates), or None. Only a member of the outermost object counts: a nested one (an Ollama tool
    call's arguments may have a `model`) is the client's data."""
    if text.count(_KEY) == 1:  # the common case, in C: the depth of the one `"model"` from the text before it
        at = text.find(_KEY)
        before = _STRING.sub(b"", text[:at])  # a quote left over: `"model"` ends a string, it is no key
        depth = before.count(b"{") + before.count(b"[") - before.count(b"}") - before.count(b"]")
        value = _STRING_VALUE.match(text, at + len(_KEY)) if depth == 1 and b'"' not in before else None
        return None if value is None else (at, value.end())
    last = text.rfind(_KEY)
    found = None
    depth = 0
    for token in _TOKEN.finditer(text):
        if token.start() > last:  # no `"model"` key after this
            break
        first = text[token.start()]
        if first == 0x22:  # '"'
            if depth == 1 and token.group() == _KEY and (value := _STRING_VALUE.match(text, token.end())):
                found = (token.start(), value.end())
        elif first in b"{[":
            depth += 1
        else:
            depth -= 1
    return found


def _with_member(text: bytes, span: tuple[int, int], replacement: bytes) -> bytes:
    return text[: span[0]] + replacement + text[span[1] :]


def rename_document(body: bytes, name: str) -> bytes:
    """A plain answer with its top-level `model` naming ``name``; unchanged when it is not a JSON object
    with a string `model`. Only that member's bytes change (the rest as the server wrote it: a document
    written again could fail or change, as a lone surrogate escape or a number out of a float's range)."""
    try:
        doc: Any = json.loads(body)
    except ValueError:  # not JSON (or not UTF-8): not ours to touch
        return body
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), str):
        return body
    span = top_level_member(body)
    return body if span is None else _with_member(body, span, member(name))


class StreamNaming:
    """Rewrites the top-level `model` member of each event (line) of a stream to ``name`` as its chunks
    pass. A chunk that ends mid-line holds that line's start back until its end comes (bounded by
    _LINE_MAX_BYTES: a longer line passes on unchanged, to its end)."""

    def __init__(self, name: str) -> None:
        self._member = member(name)
        self._pending = b""
        self._passing = False  # a line over _LINE_MAX_BYTES is passing: its rest is not an event to read

    def _rewrite(self, lines: bytes) -> bytes:
        if _KEY not in lines:
            return lines
        if lines.count(_KEY) == 1:  # the common case: one event with its member, read alone
            start = lines.rfind(b"\n", 0, lines.find(_KEY)) + 1
            end = lines.find(b"\n", start) % (len(lines) + 1)  # -1 (the last line, without its end): len
            span = top_level_member(lines[start:end])
            return lines if span is None else _with_member(lines, (start + span[0], start + span[1]), self._member)
        events = lines.split(b"\n")
        for index, event in enumerate(events):
            if _KEY in event and (span := top_level_member(event)) is not None:
                events[index] = _with_member(event, span, self._member)
        return b"\n".join(events)

    def feed(self, chunk: bytes) -> bytes:
        """What of the stream so far can go on now, rewritten."""
        if self._passing:
            end = chunk.find(b"\n") + 1
            if end == 0:
                return chunk
            self._passing = False
            return chunk[:end] + self.feed(chunk[end:])
        data = self._pending + chunk if self._pending else chunk
        cut = data.rfind(b"\n") + 1
        if cut == len(data):  # the common case: a server's chunk ends with its event
            self._pending = b""
            return self._rewrite(data)
        if cut == 0 and len(data) > _LINE_MAX_BYTES:  # no JSON event is this long: pass it on as it is
            self._pending = b""
            self._passing = True
            return data
        self._pending = data[cut:]
        return self._rewrite(data[:cut])

    def end(self) -> bytes:
        """The stream's last bytes, when it ended without a line's end."""
        rest, self._pending = self._pending, b""
        return self._rewrite(rest)
