"""A model on the Hugging Face hub as the configuration names it: `hf:ORG/REPO:QUANT`, `hf:ORG/REPO/FILE.gguf`
or `hf:ORG/REPO` (the launcher chooses the quant). Parsed and checked here, with nothing fetched: a bad
reference is one sentence at load.

A split model (`NAME-00001-of-00003.gguf`) is one model, named by its quant or by its first file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX = "hf:"
# The hub's own rule for a repo id's two parts (huggingface_hub's validate_repo_id): letters, digits, `-_.`,
# at most 96 characters, no `--` or `..`, not starting or ending with `-` or `.`.
_PART = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_QUANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]{0,31}$")
_FILE_PART = re.compile(r"^(?!\.)[A-Za-z0-9._+-]{1,200}$")
_REVISION = re.compile(r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")


@dataclass(frozen=True)
class HubRef:
    """A model on the hub: its repo, and its quant or file (neither: the largest quant that fits)."""

    repo: str  # ORG/REPO
    quant: str | None = None
    file: str | None = None  # the path in the repo of the (first) GGUF file

    def __str__(self) -> str:
        if self.file is not None:
            return f"{PREFIX}{self.repo}/{self.file}"
        return f"{PREFIX}{self.repo}" + (f":{self.quant}" if self.quant is not None else "")


def is_hub_ref(text: str) -> bool:
    return text.startswith(PREFIX)


def parse_hub_ref(text: str) -> HubRef:
    """The reference ``text`` names, or ValueError with one sentence that says what is wrong."""
    usage = "write hf:ORG/REPO, hf:ORG/REPO:QUANT or hf:ORG/REPO/FILE.gguf"
    if not is_hub_ref(text):
        raise ValueError(f"{text!r} is not a hub reference: {usage}")
    rest = text[len(PREFIX) :]
    path, colon, quant = rest.partition(":")
    parts = path.split("/")
    if len(parts) < 2 or not all(_PART.match(p) for p in parts[:2]):
        raise ValueError(f"{text!r}: ORG/REPO must be two names of letters, digits, '-', '_' or '.': {usage}")
    repo = "/".join(parts[:2])
    if colon:
        if len(parts) > 2:
            raise ValueError(f"{text!r} names both a file and a quant: {usage}")
        if not _QUANT.match(quant):
            raise ValueError(f"{text!r}: the quant {quant!r} should be a word like Q4_K_M or IQ3_XXS")
        return HubRef(repo, quant=quant)
    if len(parts) == 2:
        return HubRef(repo)
    file_parts = parts[2:]
    if not all(_FILE_PART.match(p) for p in file_parts) or not file_parts[-1].lower().endswith(".gguf"):
        raise ValueError(f"{text!r}: the file must be a path of plain names ending in .gguf: {usage}")
    return HubRef(repo, file="/".join(file_parts))


def check_revision(revision: str) -> str:
    """A branch, tag or commit as the hub names them, or ValueError."""
    if not _REVISION.match(revision):
        raise ValueError(f"revision {revision!r} is not a branch, tag or commit name")
    return revision
