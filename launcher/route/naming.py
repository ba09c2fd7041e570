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

# `"model": "..."` as a JSON member: an unescaped quote cannot occur inside a JSON string, so in a JSON
# text this matches a key and its string value, never text within a value.
_MODEL_MEMBER = re.compile(rb'"model"\s*:\s*"(?:[^"\\]|\\.)*"')
_LINE_MAX_BYTES = 1024 * 1024  # a line longer than this, still without its end, passes on unchanged


def member(name: str) -> bytes:
    """The `model` member that names ``name``, as JSON."""
    return b'"model":' + json.dumps(name, ensure_ascii=False).encode()


def rename_document(body: bytes, name: str) -> bytes:
    """A plain answer with its top-level `model` naming ``name``; unchanged when it is not a JSON object
    with a string `model`. Only that member's bytes change (the rest as the server wrote it)."""
    try:
        doc: Any = json.loads(body)
    except ValueError:  # not JSON (or not UTF-8): not ours to touch
        return body
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), str):
        return body
    if body.count(b'"model"') == 1:  # the only one is the top-level member: change its bytes alone
        return _MODEL_MEMBER.sub(lambda _: member(name), body, count=1)
    # Another `"model"` (a nested member, or text within a string): write the document again, its order kept.
    return json.dumps({**doc, "model": name}, ensure_ascii=False, separators=(",", ":")).encode()


class StreamNaming:
    """Rewrites the `model` member of each event of a stream to ``name`` as its chunks pass. A chunk that
    ends mid-line holds that line's start back until its end comes (bounded by _LINE_MAX_BYTES)."""

    def __init__(self, name: str) -> None:
        self._member = member(name)
        self._pending = b""
        self._seen = b""  # the server's own member, as it writes it in each event: replaced as bytes

    def _rewrite(self, lines: bytes) -> bytes:
        if b'"model"' not in lines:
            return lines
        if self._seen and lines.count(self._seen) == lines.count(b'"model"'):
            return lines.replace(self._seen, self._member)  # the common case, without a regex
        found = _MODEL_MEMBER.search(lines)
        if found is not None:
            self._seen = found.group(0)
        return _MODEL_MEMBER.sub(lambda _: self._member, lines)

    def feed(self, chunk: bytes) -> bytes:
        """What of the stream so far can go on now, rewritten."""
        data = self._pending + chunk if self._pending else chunk
        cut = data.rfind(b"\n") + 1
        if cut == len(data):  # the common case: a server's chunk ends with its event
            self._pending = b""
            return self._rewrite(data)
        if cut == 0 and len(data) > _LINE_MAX_BYTES:  # no JSON event is this long: pass it on as it is
            self._pending = b""
            return data
        self._pending = data[cut:]
        return self._rewrite(data[:cut])

    def end(self) -> bytes:
        """The stream's last bytes, when it ended without a line's end."""
        rest, self._pending = self._pending, b""
        return self._rewrite(rest)
