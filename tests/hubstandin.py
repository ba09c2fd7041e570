"""A stand-in for the Hugging Face hub on loopback: the routes the `huggingface_hub` client uses to list a
repo (`/api/models/ORG/REPO[/revision/REV]?blobs=true`) and to read a file (`/ORG/REPO/resolve/REV/PATH`,
GET with Range, and HEAD with the headers `hf_hub_download` reads: X-Repo-Commit, X-Linked-Etag (the
sha256, as the hub gives an LFS file), X-Linked-Size), serving files from disk, gating repos behind a token
(401 without one, 403 with another, X-Error-Code GatedRepo as the hub answers),
and counting the bytes of every file it sends (only what it writes to the socket counts).

For the download's tests it can slow its sending (`rate_bytes_s`), drop a connection once mid-file
(`drop_after_bytes`), and give a file a checksum its bytes do not have (`Repo.wrong_sha256`)."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_CHUNK = 64 * 1024


@dataclass
class Repo:
    files: dict[str, Path]  # path in the repo -> file on disk
    token: str | None = None  # gated: files need this bearer token
    ranges: bool = True  # False: a Range header is ignored and the whole file sent
    commit: str = ""
    wrong_sha256: set[str] = field(default_factory=set)  # files announced with a checksum of other bytes

    def __post_init__(self) -> None:
        self.commit = self.commit or hashlib.sha1(json.dumps(sorted(self.files)).encode()).hexdigest()


@dataclass
class StandInHub:
    repos: dict[str, Repo]
    sent_bytes: Counter[str] = field(default_factory=Counter)  # "ORG/REPO/PATH" -> file bytes sent
    requests: list[str] = field(default_factory=list)
    ranges: list[str | None] = field(default_factory=list)  # each GET's Range header
    url: str = ""
    rate_bytes_s: float | None = None  # None: as fast as the socket takes them
    drop_after_bytes: int | None = None  # the next file GET ends its connection after this many bytes
    # Per file GET, in order: its "ORG/REPO/PATH" and the bytes it sent. A GET the client gave up on may go on
    # counting a moment (what its socket still took), so what a later pull fetched is counted by its own GETs.
    get_keys: list[str] = field(default_factory=list)
    get_bytes: list[int] = field(default_factory=list)
    _sha256: dict[Path, str] = field(default_factory=dict)

    def sent_since(self, gets: int, prefix: str = "") -> int:
        """Bytes sent by the file GETs after the first ``gets`` of them, for keys that start with ``prefix``."""
        later = zip(self.get_keys[gets:], self.get_bytes[gets:], strict=True)
        return sum(n for key, n in later if key.startswith(prefix))

    def sha256(self, path: Path) -> str:
        if path not in self._sha256:
            self._sha256[path] = hashlib.sha256(path.read_bytes()).hexdigest()
        return self._sha256[path]

    @property
    def total_sent(self) -> int:
        return sum(self.sent_bytes.values())


def _handler(hub: StandInHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            return

        def handle(self) -> None:
            with suppress(ConnectionResetError):  # a client that exits with an answer unread (a CLI the gate refused)
                super().handle()

        def _error(self, status: int, code: str, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append(path)
            hub.ranges.append(self.headers.get("Range"))
            if path.startswith("/api/models/"):
                self._info(path.removeprefix("/api/models/"))
            elif (match := re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)) is not None:
                self._file(match[1], match[2], match[3])
            else:
                self._error(404, "EntryNotFound", f"no route {path}")

        def do_HEAD(self) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append(f"HEAD {path}")
            if (match := re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)) is not None:
                self._file(match[1], match[2], match[3], head=True)
            else:
                self._error(404, "EntryNotFound", f"no route {path}")

        def _info(self, rest: str) -> None:
            repo_id, _, revision = rest.partition("/revision/")
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(401, "RepoNotFound", "Repository not found")
                return
            if revision not in ("", "main", repo.commit):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return
            siblings = [{"rfilename": name, "size": disk.stat().st_size} for name, disk in sorted(repo.files.items())]
            body = json.dumps({"id": repo_id, "sha": repo.commit, "siblings": siblings}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _file(self, repo_id: str, revision: str, name: str, head: bool = False) -> None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(401, "RepoNotFound", "Repository not found")
                return
            given = self.headers.get("Authorization")
            if repo.token is not None and given != f"Bearer {repo.token}":  # as the hub: 403 for a token without access
                self._error(403 if given else 401, "GatedRepo", f"Access to model {repo_id} is restricted.")
                return
            if revision not in ("main", repo.commit) or name not in repo.files:
                self._error(404, "EntryNotFound", f"{name} not found")
                return
            disk = repo.files[name]
            size = disk.stat().st_size
            start, end = 0, size - 1
            match = _RANGE.match(self.headers.get("Range", "")) if repo.ranges else None
            if match:
                start, end = int(match[1]), min(int(match[2] or size - 1), size - 1)
            self.send_response(206 if match else 200)
            if match:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("X-Repo-Commit", repo.commit)
            if head:  # what the library reads before a download (a file's hash only then: some are 70 GB)
                sha256 = hub.sha256(disk)
                if name in repo.wrong_sha256:
                    sha256 = hashlib.sha256(sha256.encode()).hexdigest()
                self.send_header("ETag", f'"{sha256}"')
                self.send_header("X-Linked-Etag", f'"{sha256}"')
                self.send_header("X-Linked-Size", str(size))
                self.end_headers()
                return
            self.end_headers()
            drop_after, hub.drop_after_bytes = hub.drop_after_bytes, None
            sent = 0
            index = len(hub.get_keys)
            hub.get_keys.append(f"{repo_id}/{name}")
            hub.get_bytes.append(0)
            with disk.open("rb") as f:
                f.seek(start)
                left = end - start + 1
                while left > 0:
                    chunk = f.read(min(_CHUNK, left))
                    if not chunk:
                        break
                    if drop_after is not None and sent + len(chunk) > drop_after:
                        chunk = chunk[: drop_after - sent]
                        left = len(chunk)  # this chunk is the last: the connection ends after it
                    if hub.rate_bytes_s is not None:
                        time.sleep(len(chunk) / hub.rate_bytes_s)
                    try:
                        self.wfile.write(chunk)
                    except OSError:  # the client had enough
                        return
                    hub.sent_bytes[f"{repo_id}/{name}"] += len(chunk)
                    hub.get_bytes[index] += len(chunk)
                    sent += len(chunk)
                    left -= len(chunk)
            if drop_after is not None and sent < end - start + 1:
                self.close_connection = True
                self.connection.shutdown(2)  # the socket, cut mid-file

    return Handler


@contextmanager
def serving(repos: dict[str, Repo]) -> Iterator[StandInHub]:
    """The hub on a free loopback port for the block's length."""
    hub = StandInHub(repos)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
