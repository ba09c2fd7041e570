"""The hub's side of planning a hub model: the repo's listing at the commit a revision resolves to, and the
GGUF header of each file read over HTTP range requests, bounded, and cached by repo, commit and file.

A header is read from the start of the file in growing ranges (64 KiB, then four times more each time)
until launcher/plan/gguf.py's reader finds it whole; one that goes on past `hub.max_header_mib` is
refused. The reader checks every count and size against the file's size the listing gives, as it does a
local file's. Nothing of the weights is fetched: a server that ignores the range is read no further than
the bytes asked for.

Everything goes through `huggingface_hub`: its URLs (`HF_ENDPOINT`), its headers (the token: `HF_TOKEN`
or the login, unless a token is given), its HTTP session and its errors, turned here into one sentence.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from launcher.config_file import read_token
from launcher.config_hub import HubSettings
from launcher.errors import LauncherError
from launcher.hub.repo import HubFile, Listing, listing_of
from launcher.plan.gguf import HeaderIncomplete, HeaderPart, ModelFileError, parse_header

FIRST_RANGE_BYTES = 64 * 1024
_GROWTH = 4
_SIZE_PREFIX_BYTES = 8  # a cached header starts with the file's size (little-endian), then its first bytes
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class HubError(LauncherError):
    """The hub could not be asked, or said no, or its file could not be taken (exit 1; HTTP 503: the
    machine cannot do it now): one sentence, with what to do."""

    http_status = 503


@dataclass(frozen=True)
class Header:
    """A file's parsed header, and the bytes it took: fetched now, or read from the cache."""

    file: HubFile
    part: HeaderPart
    header_bytes: int  # the start of the file read to find the header whole
    fetched_bytes: int  # of them, fetched from the hub now (0: all from the cache)


class HubReader:
    """Lists repos and reads headers through `huggingface_hub`, caching headers under ``cache_dir``."""

    def __init__(self, cache_dir: Path, token: str | None, max_header_bytes: int, endpoint: str | None = None) -> None:
        self._cache_dir = cache_dir
        self._token = token
        self._max_header_bytes = max_header_bytes
        self._endpoint = endpoint  # None: the library's (HF_ENDPOINT)

    def listing(self, repo: str, revision: str | None) -> Listing:
        """The repo's GGUF files and their sizes at the commit ``revision`` (default main) resolves to."""
        from huggingface_hub import HfApi

        where = f"{repo} at {revision or 'main'}"
        with _said(where, repo):
            info = HfApi(endpoint=self._endpoint, token=self._token).model_info(
                repo, revision=revision, files_metadata=True
            )
        siblings = [(s.rfilename, s.size) for s in info.siblings or []]
        return listing_of(repo, info.sha, siblings)

    def header(self, listing: Listing, file: HubFile) -> Header:
        """The header of ``file``, from the cache when it holds it, else fetched over range requests."""
        cached = self._cached(listing, file)
        if cached is not None:
            return cached
        data = b""
        want = min(FIRST_RANGE_BYTES, file.size_bytes)
        name = Path(f"hf:{listing.repo}/{file.path}")
        while True:
            asked = want - len(data)
            data += self._fetch(listing, file, len(data), want)
            if len(data) < want:
                raise HubError(f"the hub sent {asked - (want - len(data))} of the {asked} bytes asked of {name}")
            try:
                part = parse_header(data, name, file.size_bytes)
            except HeaderIncomplete:
                if want >= min(self._max_header_bytes, file.size_bytes):
                    raise ModelFileError(
                        f"{name}: the GGUF header goes on past {want} bytes, more than hub.max_header_mib allows",
                        hint="raise hub.max_header_mib if the file is one you trust",
                    ) from None
                want = min(want * _GROWTH, self._max_header_bytes, file.size_bytes)
                continue
            self._store(listing, file, data)
            return Header(file, part, len(data), len(data))

    def _fetch(self, listing: Listing, file: HubFile, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` (exclusive) of the file, never more, whatever the server sends."""
        from huggingface_hub import get_session, hf_hub_url, hf_raise_for_status
        from huggingface_hub.utils import build_hf_headers

        url = hf_hub_url(listing.repo, file.path, revision=listing.commit, endpoint=self._endpoint)
        headers = {**build_hf_headers(token=self._token), "Range": f"bytes={start}-{end - 1}"}
        chunks: list[bytes] = []
        with (
            _said(f"{listing.repo}/{file.path}", listing.repo),
            get_session().stream("GET", url, headers=headers, follow_redirects=True) as response,
        ):
            if response.status_code >= 400:
                response.read()
                hf_raise_for_status(response)
            if response.status_code == 206:
                if _range_start(response.headers.get("Content-Range")) != start:
                    raise HubError(f"the hub answered a range of {file.path} with another range")
                skip = 0
            else:  # the whole file: only its start is read
                skip = start
            got = 0
            for chunk in response.iter_bytes():
                chunks.append(chunk)
                got += len(chunk)
                if got >= skip + end - start:  # enough: the rest is never read
                    break
        return b"".join(chunks)[skip : skip + end - start]

    def _cache_file(self, listing: Listing, file: HubFile) -> Path:
        # The commit and every part of the path were checked to be plain names (repo.listing_of).
        return self._cache_dir / listing.repo.replace("/", "--") / listing.commit / f"{file.path}.header"

    def _cached(self, listing: Listing, file: HubFile) -> Header | None:
        path = self._cache_file(listing, file)
        try:
            with path.open("rb") as f:
                data = f.read(_SIZE_PREFIX_BYTES + self._max_header_bytes)
        except OSError:
            return None
        if int.from_bytes(data[:_SIZE_PREFIX_BYTES], "little") != file.size_bytes:
            return None
        try:
            part = parse_header(data[_SIZE_PREFIX_BYTES:], Path(f"hf:{listing.repo}/{file.path}"), file.size_bytes)
        except ModelFileError:  # cut short (a smaller limit then): fetched again
            return None
        return Header(file, part, len(data) - _SIZE_PREFIX_BYTES, 0)

    def _store(self, listing: Listing, file: HubFile, data: bytes) -> None:
        """Written whole or not at all (a temporary file renamed); a cache that cannot be written costs a
        fetch next time, nothing else."""
        path = self._cache_file(listing, file)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
                tmp.write(file.size_bytes.to_bytes(_SIZE_PREFIX_BYTES, "little") + data)
            os.replace(tmp.name, path)
        except OSError:
            return


@contextmanager
def _said(what: str, repo: str) -> Iterator[None]:
    """The library's errors, and the network's, as one sentence that says what to do."""
    import httpx2  # the library's HTTP client
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except OfflineModeIsEnabled:
        raise HubError(
            f"HF_HUB_OFFLINE is set: the hub is not asked for {what}, so it cannot be planned yet",
            hint="unset HF_HUB_OFFLINE to plan it from its headers",
        ) from None
    except GatedRepoError as exc:
        page = f"{constants.ENDPOINT}/{repo}"
        # 401: no token (or one the hub does not know); 403: a token the hub knows, whose account has no
        # access, where setting HF_TOKEN again would change nothing.
        refused = exc.response is not None and exc.response.status_code == 403
        raise HubError(
            f"{repo} is a gated repo: {what} needs access",
            hint=(
                f"the token given has no access to it: ask for access on its page ({page}) with the account "
                "the token belongs to, or give the token of an account that has access"
                if refused
                else f"ask for access on its page ({page}), then set HF_TOKEN or hub.token_file"
            ),
        ) from None
    except RepositoryNotFoundError:
        raise HubError(
            f"no repo {repo} on the hub (or it is private)",
            hint="check the name; a private repo needs a token (HF_TOKEN or hub.token_file) of an account that can "
            "read it",
        ) from None
    except RevisionNotFoundError:
        raise HubError(f"{what}: no such revision in {repo}", hint="check the model's revision") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise HubError(f"the hub answered {status} for {what}", hint=_first_line(str(exc))) from None
    except httpx2.HTTPError as exc:
        raise HubError(
            f"the hub at {constants.ENDPOINT} cannot be reached for {what}: "
            + (_first_line(str(exc)) or type(exc).__name__),
            hint="check the network, or HF_ENDPOINT",
        ) from None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:300] if text.strip() else ""


def _range_start(content_range: str | None) -> int | None:
    match = _CONTENT_RANGE.match(content_range or "")
    return int(match[1]) if match else None


def hub_reader(settings: HubSettings, headers_dir: Path) -> HubReader:
    """The reader the configuration's `hub:` section asks for, caching headers in ``headers_dir``."""
    token = read_token(settings.token_file, "hub.token_file")
    return HubReader(headers_dir, token, settings.max_header_mib * 1024 * 1024)
