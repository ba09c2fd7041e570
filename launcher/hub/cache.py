"""A hub model's files in the Hugging Face cache (`HF_HUB_CACHE`, the `huggingface_hub` library's layout:
`models--ORG--REPO/{blobs,snapshots/COMMIT,refs/REVISION}`), shared with every other tool that uses it.

The revision resolves through `refs/` (written by a pull) or is a commit; the snapshot's GGUF files are
listed as the hub's listing is (repo.py), so `hf:ORG/REPO:QUANT` names the same model in both. A reference
without a quant is the largest model the snapshot holds whole: the one a pull chose to fetch."""

from __future__ import annotations

import os
import re
from pathlib import Path

from launcher.errors import ConfigError
from launcher.hub.repo import HubFile, Listing, listing_of, selected
from launcher.hub_ref import HubRef

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def cache_dir() -> Path:
    """The library's cache directory (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_dir(repo: str, cache: Path) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return cache / repo_folder_name(repo_id=repo, repo_type="model")


def commit_of(repo: str, revision: str | None, cache: Path) -> str | None:
    """The commit ``revision`` (default main) resolved to at the last pull, from the cache's refs."""
    revision = revision or "main"
    if _COMMIT.match(revision):
        return revision
    try:
        found = (repo_dir(repo, cache) / "refs" / revision).read_text(encoding="ascii").strip()
    except (OSError, ValueError):
        return None
    return found if _COMMIT.match(found) else None


def write_ref(repo: str, revision: str, commit: str, cache: Path) -> None:
    """Record that ``revision`` resolved to ``commit`` (the layout's `refs/REVISION`), written whole."""
    if _COMMIT.match(revision):
        return
    ref = repo_dir(repo, cache) / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
    tmp.write_text(commit, encoding="ascii")
    os.replace(tmp, ref)


def cached_listing(repo: str, revision: str | None, cache: Path) -> Listing | None:
    """The GGUF files of the snapshot ``revision`` resolves to in the cache (only those there whole: a
    link to a blob that exists), or None when the cache has no such snapshot."""
    commit = commit_of(repo, revision, cache)
    if commit is None:
        return None
    snapshot = repo_dir(repo, cache) / "snapshots" / commit
    if not snapshot.is_dir():
        return None
    found: list[tuple[object, object]] = []
    for path in sorted(snapshot.rglob("*.gguf")):
        try:
            found.append((path.relative_to(snapshot).as_posix(), path.stat().st_size))
        except OSError:  # a link whose blob is gone
            continue
    return listing_of(repo, commit, found)


def cached_model(ref: HubRef, revision: str | None, cache: Path | None = None) -> Path | None:
    """The path of the (first) file of the model ``ref`` names in the cache, or None when it is not there
    whole (each of a split model's parts)."""
    cache = cache or cache_dir()
    listing = cached_listing(ref.repo, revision, cache)
    if listing is None:
        return None
    try:
        models = selected(ref, listing, revision or "main")
    except ConfigError:
        return None
    snapshot = repo_dir(ref.repo, cache) / "snapshots" / listing.commit
    return snapshot / models[-1].files[0].path  # smallest first: the largest there


def missing(repo: str, commit: str, files: tuple[HubFile, ...], cache: Path) -> list[HubFile]:
    """Of ``files`` at ``commit``, those the cache's snapshot lacks."""
    snapshot = repo_dir(repo, cache) / "snapshots" / commit
    return [f for f in files if not (snapshot / f.path).is_file()]


def cached_file(ref: HubRef, revision: str | None, cache: Path | None = None) -> Path | None:
    """The file ``ref`` names (`hf:ORG/REPO/FILE.gguf`: a projector, say) in the cache, or None."""
    cache = cache or cache_dir()
    commit = commit_of(ref.repo, revision, cache)
    if commit is None or ref.file is None:
        return None
    path = repo_dir(ref.repo, cache) / "snapshots" / commit / ref.file
    return path if path.is_file() else None
