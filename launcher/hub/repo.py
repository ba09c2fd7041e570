"""A hub repo's GGUF files at one commit, grouped into models: a file, or the files of a split model
(`NAME-00001-of-00003.gguf`) as one; each with its quant read from its name (`...-Q4_K_M.gguf`). Which of
them a reference names (`hf:ORG/REPO:QUANT`, `hf:ORG/REPO/FILE.gguf`, or all quants for `hf:ORG/REPO`).

The listing is the hub's answer, so hostile: a file name that is not a plain path (`..`, a leading `/`)
is never used, and the commit must be a commit id before it names a cache directory.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from launcher.errors import ConfigError
from launcher.hub_ref import HubRef

_PLAIN = re.compile(r"^(?!\.)[A-Za-z0-9._+-]{1,200}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHARD = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
# llama.cpp's quantisation names as model files carry them: Q4_K_M, IQ3_XXS, Q8_0, F16, BF16, TQ1_0, MXFP4.
_QUANT = re.compile(
    r"(?<![A-Za-z0-9])(I?Q\d(?:_[0-9A-Z]+)*|TQ\d_\d|MXFP4(?:_MOE)?|BF16|F16|F32)(?![A-Za-z0-9])", re.IGNORECASE
)


@dataclass(frozen=True)
class HubFile:
    path: str  # in the repo
    size_bytes: int


@dataclass(frozen=True)
class Listing:
    """A repo's GGUF files at the commit its revision resolved to."""

    repo: str
    commit: str
    files: tuple[HubFile, ...]


@dataclass(frozen=True)
class HubModel:
    """One model of a repo: its files, the first (the one holding the metadata) first."""

    quant: str | None
    files: tuple[HubFile, ...]

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)

    @property
    def name(self) -> str:
        return self.quant or self.files[0].path


def listing_of(repo: str, commit: object, siblings: Sequence[tuple[object, object]]) -> Listing:
    """The listing from the hub's answer: the commit, and (name, size) per file; only plain GGUF paths."""
    if not isinstance(commit, str) or not _COMMIT.match(commit):
        raise ConfigError(f"the hub answered for {repo} without a commit id ({str(commit)[:60]!r})")
    files = tuple(
        HubFile(name, size)
        for name, size in siblings
        if isinstance(name, str)
        and name.lower().endswith(".gguf")
        and all(_PLAIN.match(part) for part in name.split("/"))
        and isinstance(size, int)
        and size >= 0
    )
    return Listing(repo, commit, files)


def quant_of(path: str) -> str | None:
    """The quant a file's name carries (the last one in it), upper case; None when it names none."""
    stem = path.rsplit("/", 1)[-1]
    shard = _SHARD.match(stem)
    stem = shard["prefix"] if shard else stem[: -len(".gguf")]
    found = _QUANT.findall(stem)
    return found[-1].upper() if found else None


def _is_projector(path: str) -> bool:
    return path.rsplit("/", 1)[-1].lower().startswith("mmproj")


def models_in(listing: Listing) -> list[HubModel]:
    """The repo's models, a split model's files as one (only when all of its parts are there), multimodal
    projectors left out; smallest first."""
    models = []
    groups: dict[tuple[str, int], dict[int, HubFile]] = {}
    for file in listing.files:
        if _is_projector(file.path):
            continue
        shard = _SHARD.match(file.path)
        if shard is None:
            models.append(HubModel(quant_of(file.path), (file,)))
        else:
            groups.setdefault((shard["prefix"], int(shard["count"])), {})[int(shard["no"])] = file
    for (_, count), parts in groups.items():
        if sorted(parts) == list(range(1, count + 1)):
            models.append(HubModel(quant_of(parts[1].path), tuple(parts[no] for no in range(1, count + 1))))
    return sorted(models, key=lambda m: (m.size_bytes, m.files[0].path))


def selected(ref: HubRef, listing: Listing, revision: str) -> list[HubModel]:
    """The models ``ref`` names in ``listing``: one for a file or a quant, every quant for a bare repo."""
    models = models_in(listing)
    where = f"{listing.repo} at {revision}"
    if not models:
        raise ConfigError(f"{where} has no GGUF model file", hint="name a repo of GGUF files (often ...-GGUF)")
    if ref.file is not None:
        chosen = [m for m in models if m.files[0].path == ref.file]
        if not chosen:
            part = any(ref.file == f.path for m in models for f in m.files[1:])
            what = "not the first file of a split model" if part else "not a GGUF model file"
            raise ConfigError(
                f"{ref.file} is {what} in {where}",
                hint="files there: " + _names([m.files[0].path for m in models]),
            )
        return chosen
    if ref.quant is not None:
        chosen = [m for m in models if m.quant is not None and m.quant == ref.quant.upper()]
        if not chosen:
            raise ConfigError(f"{where} has no quant {ref.quant}", hint="quants there: " + _quants(models))
        if len(chosen) > 1:
            raise ConfigError(
                f"{where} has {len(chosen)} models of quant {ref.quant}",
                hint="name the file instead: " + _names([m.files[0].path for m in chosen]),
            )
        return chosen
    return models


def _quants(models: Sequence[HubModel]) -> str:
    return _names(list(dict.fromkeys(m.quant for m in models if m.quant is not None))) or "none named in the files"


def _names(names: Sequence[str]) -> str:
    return ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
