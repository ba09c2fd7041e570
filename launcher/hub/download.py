"""A hub model's files downloaded into the Hugging Face cache at the planned commit: resumable, checked
against the hub's checksum, refused before the first byte when the disk cannot hold them.

The transfer is the `huggingface_hub` library's own (`http_get`: its session, headers, retries and resume by
Range after a dropped connection), and the file is linked into its snapshot by `hf_hub_download` itself.
What the library does not do is added here:
- a download interrupted (a daemon killed, a stop) resumes at the next pull: the partial file is kept under
  a stable name, `blobs/ETAG.incomplete` (the library's own name for it before 1.0), where the library now
  deletes its per-process partial file on any failure;
- the bytes are checked against the hub's checksum (an LFS file's ETag is its sha256, a small file's its
  git blob sha1): the library checks only the size. A file that does not match is removed, never linked;
- free space is checked for every byte still to come, before the first (the library only warns).

Nothing half-written is ever in the snapshot: the blob appears whole (a rename), then its link."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.errors import LauncherError
from launcher.hub.cache import missing, repo_dir, write_ref
from launcher.hub.headers import HubError, _said
from launcher.hub.repo import HubFile

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_HASH_READ_BYTES = 1024 * 1024


class PullCancelled(LauncherError):
    """A pull stopped on request (a stop of the instance): its partial files are kept for the next one."""


@dataclass(frozen=True)
class PullProgress:
    done_bytes: int  # of the files still to fetch when the pull began, partial files included
    total_bytes: int
    file: str  # the one being fetched


def disk_free_bytes(path: Path) -> int:
    """Free bytes on the file system of ``path`` (its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


@dataclass(frozen=True)
class _Remote:
    file: HubFile
    url: str
    etag: str
    size_bytes: int


class _CheckedFile:
    """The partial file as the library writes it: each chunk written and hashed by a worker thread while
    the library reads the next one from the socket (hashing in line would cost a third of the throughput),
    counted, and refused once a stop is asked for (the library writes every 10 MiB chunk, so a stop takes
    effect within one). An error of a write (a full disk) comes out of the next call."""

    def __init__(
        self, path: Path, remote: _Remote, on_bytes: Callable[[int], None], cancelled: threading.Event
    ) -> None:
        self._path, self._remote = path, remote
        self._hasher = _hashed_prefix(path, remote.etag, remote.size_bytes)
        self._file = path.open("r+b")
        self._file.seek(0, os.SEEK_END)
        self._on_bytes = on_bytes
        self._cancelled = cancelled
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pull-write")
        self._pending: Future[None] | None = None

    def _settled(self) -> None:
        """Wait for the chunk in hand; its error, if any, raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _put(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._hasher.update(chunk)

    def write(self, chunk: bytes) -> int:
        self._settled()
        if self._cancelled.is_set():
            raise PullCancelled("the download was stopped; its partial file is kept for the next pull")
        self._pending = self._worker.submit(self._put, chunk)
        self._on_bytes(len(chunk))
        return len(chunk)

    def tell(self) -> int:
        self._settled()
        return self._file.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._settled()
        return self._file.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        # The library truncates when a server ignored the Range of a resume: the file comes again from 0.
        self._settled()
        cut = self._file.truncate(size)
        self._file.flush()
        self._hasher = _hashed_prefix(self._path, self._remote.etag, self._remote.size_bytes)
        return cut

    def finish(self) -> str:
        """The hash of the whole file, once its last chunk is written (raises that write's error)."""
        self._settled()
        self._file.flush()
        return str(self._hasher.hexdigest())

    def close(self) -> None:
        """Whatever happened: the chunk in hand written (what is kept resumes), the file closed."""
        with contextlib.suppress(Exception):
            self._settled()
        self._worker.shutdown()
        self._file.close()


def _hasher_for(etag: str, size: int) -> Any:
    """The hash the hub's ETag is of: sha256 for an LFS file, else the git blob sha1 (header, then bytes)."""
    if _SHA256.match(etag):
        return hashlib.sha256()
    hasher = hashlib.sha1()
    hasher.update(f"blob {size}\0".encode())
    return hasher


def _hashed_prefix(path: Path, etag: str, size: int) -> Any:
    hasher = _hasher_for(etag, size)
    with path.open("rb") as f:
        while block := f.read(_HASH_READ_BYTES):
            hasher.update(block)
    return hasher


class _Quiet:
    """A progress bar class for the library that shows nothing (progress is reported by `on_progress`)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        return

    def update(self, n: int = 1) -> None:
        return

    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *exc: object) -> None:
        return


def pull(
    repo: str,
    revision: str,
    commit: str,
    files: Sequence[HubFile],
    *,
    cache: Path,
    token: str | None,
    endpoint: str | None = None,
    on_progress: Callable[[PullProgress], None] = lambda p: None,
    cancelled: threading.Event | None = None,
    free_bytes: Callable[[Path], int] = disk_free_bytes,
) -> list[Path]:
    """Download the ``files`` of ``repo`` at ``commit`` that the cache lacks; the paths of all of them in the
    snapshot. Blocks: run it off the event loop. Raises HubError (one sentence), PullCancelled."""
    from huggingface_hub import constants

    cancelled = cancelled or threading.Event()
    snapshot = repo_dir(repo, cache) / "snapshots" / commit
    lacking = missing(repo, commit, tuple(files), cache)
    if lacking and constants.HF_HUB_OFFLINE:
        raise HubError(
            f"HF_HUB_OFFLINE is set and {len(lacking)} file(s) of {repo} are not in the cache {cache} "
            f"({lacking[0].path})",
            hint="unset HF_HUB_OFFLINE to download them, or pull them where the hub can be reached",
        )
    remotes = [_remote(repo, commit, f, token, endpoint) for f in lacking]
    blobs = repo_dir(repo, cache) / "blobs"
    partial = {r.etag: min(_partial_size(blobs / f"{r.etag}.incomplete"), r.size_bytes) for r in remotes}
    _check_space(repo, remotes, partial, cache, free_bytes)
    total = sum(r.size_bytes for r in remotes)
    done = sum(partial.values())
    if remotes:  # where it starts (a resumed pull: past its partial files), the first reading of its rate
        on_progress(PullProgress(done, total, remotes[0].file.path))
    try:
        for remote in remotes:
            if not (blobs / remote.etag).is_file():

                def counted(n: int, file: str = remote.file.path) -> None:
                    nonlocal done
                    done += n
                    on_progress(PullProgress(done, total, file))

                _fetch(repo, remote, blobs, token, counted, cancelled)
            else:
                done += remote.size_bytes - partial[remote.etag]
            _link(repo, commit, remote.file, cache, token, endpoint)
            on_progress(PullProgress(done, total, remote.file.path))
        write_ref(repo, revision, commit, cache)
    except OSError as exc:  # the cache's folders, lock, link or ref (the transfer's own errors are said in _fetch)
        raise HubError(
            f"the Hugging Face cache {cache} cannot be written for {repo}: {exc.strerror or exc} "
            f"({exc.filename or cache})",
            hint="set HF_HUB_CACHE (or HF_HOME) to a folder this user may write",
        ) from None
    return [snapshot / f.path for f in files]


def _remote(repo: str, commit: str, file: HubFile, token: str | None, endpoint: str | None) -> _Remote:
    """The file's URL, ETag and size as the hub says (the library's HEAD, redirects followed)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(repo, file.path, revision=commit, endpoint=endpoint)
    with _said(f"{repo}/{file.path}", repo):
        meta = get_hf_file_metadata(url, token=token, endpoint=endpoint)
    etag = meta.etag or ""
    if not (_SHA256.match(etag) or _SHA1.match(etag)):
        raise HubError(f"the hub gave {repo}/{file.path} no checksum (ETag {etag[:80]!r}): it is not downloaded")
    if meta.size != file.size_bytes:
        raise HubError(f"the hub gives {repo}/{file.path} {meta.size} bytes, its listing {file.size_bytes}")
    return _Remote(file, meta.location or url, etag, file.size_bytes)


def _partial_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _check_space(
    repo: str, remotes: Sequence[_Remote], partial: dict[str, int], cache: Path, free_bytes: Callable[[Path], int]
) -> None:
    need = sum(r.size_bytes - partial[r.etag] for r in remotes)
    free = free_bytes(cache)
    if need > free:
        raise HubError(
            f"not enough disk space for {repo}: {need} bytes still to download, {free} free in {cache}",
            hint="free some space, or set HF_HUB_CACHE to a larger disk",
        )


def _fetch(
    repo: str,
    remote: _Remote,
    blobs: Path,
    token: str | None,
    on_bytes: Callable[[int], None],
    cancelled: threading.Event,
) -> None:
    """The blob, resumed from its partial file, checked, and renamed into place whole."""
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    name = f"{repo}/{remote.file.path}"
    blobs.mkdir(parents=True, exist_ok=True)
    incomplete = blobs / f"{remote.etag}.incomplete"
    lock = blobs.parent.parent / ".locks" / blobs.parent.name / f"{remote.etag}.launcher.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):  # a CLI pull and the daemon's: one writes the partial file at a time
        if (blobs / remote.etag).is_file():
            return
        incomplete.touch()
        if incomplete.stat().st_size > remote.size_bytes:  # not a partial of this file: its prefix may be
            os.truncate(incomplete, remote.size_bytes)  # (the hash says), and nothing beyond the end is asked for
        resume = incomplete.stat().st_size
        target = _CheckedFile(incomplete, remote, on_bytes, cancelled)
        try:
            with _said(name, repo):
                http_get(
                    remote.url,
                    target,  # type: ignore[arg-type]  # the file-like methods the library uses
                    resume_size=resume,
                    headers=build_hf_headers(token=token),
                    expected_size=remote.size_bytes,
                    displayed_filename=remote.file.path,
                    tqdm_class=_Quiet,
                )
                got = target.finish()
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise HubError(
                    f"the disk filled while downloading {name}: {_partial_size(incomplete)} of {remote.size_bytes} "
                    f"bytes kept in {incomplete}, resumed by the next pull",
                    hint="free some space, then pull again",
                ) from None
            raise HubError(f"{name} could not be downloaded: {exc}", hint="pull again: it resumes") from None
        finally:
            target.close()
        if got != remote.etag:
            incomplete.unlink(missing_ok=True)
            raise HubError(
                f"{name} does not match the hub's checksum ({remote.etag[:16]}… expected, {got[:16]}… received): "
                "removed, never loaded",
                hint="pull again; if it recurs, the hub's copy or the network is at fault",
            )
        os.chmod(incomplete, 0o644)
        os.replace(incomplete, blobs / remote.etag)


def _link(repo: str, commit: str, file: HubFile, cache: Path, token: str | None, endpoint: str | None) -> None:
    """The snapshot's link to the blob, made by the library (it finds the blob there and downloads nothing)."""
    from huggingface_hub import hf_hub_download

    with _said(f"{repo}/{file.path}", repo):
        hf_hub_download(repo, file.path, revision=commit, cache_dir=cache, token=token, endpoint=endpoint)
