"""Saved prompt caches of llama-server's slots: which saved cache fits a start, and which to delete (pure).

A server the launcher stops on purpose saves each slot's cache (`POST /slots/ID?action=save`) into its
instance's directory, as `KEY-slotID.bin` files and a `KEY.json` manifest written last (a save cut short
leaves no manifest, so it is never restored). KEY names what the cache is valid for: the server's command
line less its port (model path, context, cache types, slots, layers, split: everything that shapes the
KV cache), the settings its environment gives it (`LLAMA_ARG_*`: llama-server reads each of its arguments
from one) and the size and modification time of every file the command line names (the model, the binary). The next
start with the same KEY restores them before it is marked ready; a start with any other KEY ignores them,
and the budgets delete them in time, least recently used first: each model's (its replicas' caches
together) and the total.

The effects (the server's HTTP API, the files) are slot_store.py's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from launcher.replicas import model_of

SAVE_PATH_FLAG = "--slot-save-path"
_IGNORED_FLAGS = frozenset({"--port", SAVE_PATH_FLAG})
_SETTING_ENV_PREFIX = "LLAMA_ARG_"  # llama-server's name of the variable of each argument (`--help` says)
_KEY_HEX = 16
MANIFEST_SUFFIX = ".json"
SLOT_FILE_SUFFIX = ".bin"


@dataclass(frozen=True)
class FileFacts:
    """A file the command line names, as found on disk."""

    path: str
    size_bytes: int
    mtime_ns: int


def cache_key(argv: Sequence[str], files: Iterable[FileFacts], env: Mapping[str, str]) -> str:
    """What a saved cache must match to be restored: the command line less its port and save path (the
    only parts that differ between two starts of one model with one setting), the settings in the server's
    environment ``env`` (a RoPE base or cache type given as `LLAMA_ARG_*` shapes the cache as an argument
    does), and the files the command line names."""
    facts = sorted((f.path, f.size_bytes, f.mtime_ns) for f in files)
    kept: dict[str, object] = {"argv": _kept_args(argv), "files": facts}
    if settings := sorted((k, v) for k, v in env.items() if k.startswith(_SETTING_ENV_PREFIX)):
        kept["env"] = settings  # only when there are some: the keys of caches saved without stay as they were
    text = json.dumps(kept, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:_KEY_HEX]


def named_paths(argv: Sequence[str]) -> list[str]:
    """The absolute paths a command line names (its binary and model among them, not the save directory,
    which changes as caches are written), whose files are part of a cache's key."""
    return [arg for arg in _kept_args(argv) if arg.startswith("/")]


def _kept_args(argv: Sequence[str]) -> list[str]:
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _IGNORED_FLAGS:
            skip = True  # and its value
        else:
            kept.append(arg)
    return kept


def slot_file(key: str, slot: int) -> str:
    """A slot's file name: letters, digits, `-` and `.` only, as llama-server requires of one."""
    return f"{key}-slot{slot}{SLOT_FILE_SUFFIX}"


def manifest_file(key: str) -> str:
    return f"{key}{MANIFEST_SUFFIX}"


def key_of(file_name: str) -> str | None:
    """The key a file in a cache directory belongs to, or None for a file that is not one of ours."""
    stem = file_name.split("-slot", 1)[0] if file_name.endswith(SLOT_FILE_SUFFIX) else None
    if file_name.endswith(MANIFEST_SUFFIX):
        stem = file_name[: -len(MANIFEST_SUFFIX)]
    if stem is None or len(stem) != _KEY_HEX or any(c not in "0123456789abcdef" for c in stem):
        return None
    return stem


def saved_slots(manifest_text: str) -> list[int]:
    """The slots a manifest lists as saved whole; a manifest that cannot be read lists none."""
    try:
        found = json.loads(manifest_text)
        slots = found.get("slots") if isinstance(found, dict) else None
    except ValueError:
        return []
    if not isinstance(slots, list):
        return []
    return [s for s in slots if isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 4096]


def manifest_text(slots: Sequence[int], tokens: int) -> str:
    return json.dumps({"slots": list(slots), "tokens": tokens})


@dataclass(frozen=True)
class SavedCache:
    """One saved cache: an instance's files of one key."""

    instance: str
    model: str  # the configured model the instance serves, whose budget it counts against
    key: str
    size_bytes: int
    used_s: float  # when it was last saved or restored (its manifest's mtime); 0 for one without a manifest
    whole: bool  # it has a manifest: a cut save's files have none and are deleted first


def to_delete(
    caches: Sequence[SavedCache], per_model_max_bytes: Callable[[str], int], total_max_bytes: int
) -> list[SavedCache]:
    """The caches to delete so that each model's (those of all its replicas) stay within its budget and
    all of them within the total: the least recently used first; a cut save's files (no manifest) always
    go."""
    order = sorted(caches, key=lambda c: (c.whole, c.used_s), reverse=True)  # newest whole first
    used_by: dict[str, int] = {}
    total = 0
    deleted: list[SavedCache] = []
    for cache in order:
        mine = used_by.get(cache.model, 0) + cache.size_bytes
        if not cache.whole or mine > per_model_max_bytes(cache.model) or total + cache.size_bytes > total_max_bytes:
            deleted.append(cache)
            continue
        used_by[cache.model] = mine
        total += cache.size_bytes
    return deleted


def group(files: Iterable[tuple[str, Path, int, float]]) -> list[SavedCache]:
    """Caches from the files of the cache directories: (instance, file, size, mtime) each."""
    sizes: dict[tuple[str, str], int] = {}
    used: dict[tuple[str, str], float] = {}
    for instance, path, size_bytes, mtime_s in files:
        key = key_of(path.name)
        if key is None:
            continue
        sizes[instance, key] = sizes.get((instance, key), 0) + size_bytes
        if path.name.endswith(MANIFEST_SUFFIX):
            used[instance, key] = mtime_s
    return [
        SavedCache(instance, model_of(instance), key, size, used.get((instance, key), 0.0), (instance, key) in used)
        for (instance, key), size in sizes.items()
    ]


def budget_of(budgets: Mapping[str, int], default: int) -> Callable[[str], int]:
    """Each model's budget; a model no longer configured gets ``default`` (its caches wait for the total
    budget to delete them)."""
    return lambda model: budgets.get(model, default)
