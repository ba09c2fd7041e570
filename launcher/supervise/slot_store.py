"""The saved prompt caches of llama-server's slots on disk, and the server API calls that save and restore
them (what is kept and what matches is slot_cache.py's decision).

ROOT/INSTANCE/KEY-slotN.bin   a slot's cache, written by the server itself (its `--slot-save-path`)
ROOT/INSTANCE/KEY.json        the slots saved whole, written last (slot_cache.py)

ROOT is the daemon's `kv_cache_dir`, else STATE_DIR/kv-cache. Every call is bounded by the time it is
given and answers in words for the instance's event; no failure here stops a stop or a start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from launcher.replicas import model_of
from launcher.supervise import slot_cache

_GIB = 1024**3


@dataclass(frozen=True)
class SlotStore:
    """Where the caches are, and the total budget of them all."""

    root: Path
    total_max_bytes: int
    http: httpx.AsyncClient

    def directory(self, instance: str) -> Path:
        return self.root / instance

    def prepare(self, instance: str, argv: list[str], env: Mapping[str, str]) -> str:
        """Make the instance's directory and answer the key of a start with ``argv`` and ``env`` (reads the
        disk)."""
        self.directory(instance).mkdir(parents=True, exist_ok=True)
        facts = []
        for path in slot_cache.named_paths(argv):
            with contextlib.suppress(OSError):
                found = os.stat(path)
                facts.append(slot_cache.FileFacts(path, found.st_size, found.st_mtime_ns))
        return slot_cache.cache_key(argv, facts, env)

    async def save(self, instance: str, port: int, key: str, budget_s: float, model_max_bytes: int) -> str:
        """Save the slots that hold a prompt, ``budget_s`` at most; the manifest goes last, only when all
        of them were saved. Then the budgets delete what no longer fits (``model_max_bytes``: the budget of
        the instance's model, its replicas' caches together). Answers what happened."""
        directory = self.directory(instance)
        began = time.monotonic()
        manifest = directory / slot_cache.manifest_file(key)
        manifest.unlink(missing_ok=True)  # the files it lists are about to be overwritten
        saved: list[int] = []
        tokens = 0
        try:
            async with asyncio.timeout(budget_s):
                for slot in await self._slots_with_prompt(port):
                    name = slot_cache.slot_file(key, slot)
                    answer = await self._post(port, slot, "save", name)
                    count = answer.get("n_saved")
                    if isinstance(count, int) and count > 0:
                        saved.append(slot)
                        tokens += count
                    else:  # an empty slot: its file holds nothing worth a restore
                        (directory / name).unlink(missing_ok=True)
        except TimeoutError:
            return f"prompt cache not saved: the save took over {budget_s:g}s (the stop went on)"
        except (httpx.HTTPError, ValueError, OSError) as exc:
            return f"prompt cache not saved: {type(exc).__name__}: {exc}"
        if saved:
            await asyncio.to_thread(manifest.write_text, slot_cache.manifest_text(saved, tokens))
        await asyncio.to_thread(self.enforce, {model_of(instance): model_max_bytes})
        return f"prompt cache saved: {len(saved)} slots, {tokens} tokens in {time.monotonic() - began:.2f}s"

    async def restore(self, instance: str, port: int, key: str, budget_s: float) -> str | None:
        """Restore the slots of a cache saved with ``key``, ``budget_s`` at most; None when there is none.
        Its manifest is taken away while it restores and put back only once all went well: a cache that
        fails (a truncated or foreign file kills llama-server as it reads it) is never tried again, where
        each restart of the server restored it again and died, until the restart policy gave up."""
        manifest = self.directory(instance) / slot_cache.manifest_file(key)
        try:
            text = await asyncio.to_thread(manifest.read_text)
            await asyncio.to_thread(manifest.unlink)
        except OSError:
            return None
        slots = slot_cache.saved_slots(text)
        if not slots:
            return None
        began = time.monotonic()
        tokens = 0
        try:
            async with asyncio.timeout(budget_s):
                for slot in slots:
                    count = (await self._post(port, slot, "restore", slot_cache.slot_file(key, slot))).get("n_restored")
                    tokens += count if isinstance(count, int) else 0
            await asyncio.to_thread(manifest.write_text, text)  # back, and used now: the last to go
        except TimeoutError:
            why = f"the restore took over {budget_s:g}s"
        except (httpx.HTTPError, ValueError, OSError) as exc:
            why = f"{type(exc).__name__}: {exc}"
        else:
            return f"prompt cache restored: {len(slots)} slots, {tokens} tokens in {time.monotonic() - began:.2f}s"
        await asyncio.to_thread(self._delete, instance, key)
        return f"prompt cache not restored: {why} (it is deleted)"

    def _delete(self, instance: str, key: str) -> None:
        """Delete the files of the instance's cache ``key``."""
        with contextlib.suppress(OSError):
            for path in self.directory(instance).iterdir():
                if slot_cache.key_of(path.name) == key:
                    path.unlink(missing_ok=True)

    def enforce(self, budgets: Mapping[str, int]) -> None:
        """Delete the caches the budgets (``budgets``: per model) leave no room for (reads and deletes files:
        off the event loop)."""
        files = []
        with contextlib.suppress(OSError):
            for folder in self.root.iterdir():
                with contextlib.suppress(OSError):
                    for path in folder.iterdir():
                        with contextlib.suppress(OSError):
                            found = path.stat()
                            files.append((folder.name, path, found.st_size, found.st_mtime))
        caches = slot_cache.group(files)
        for cache in slot_cache.to_delete(
            caches, slot_cache.budget_of(budgets, self.total_max_bytes), self.total_max_bytes
        ):
            self._delete(cache.instance, cache.key)

    async def _slots_with_prompt(self, port: int) -> list[int]:
        response = await self.http.get(f"http://127.0.0.1:{port}/slots")
        response.raise_for_status()
        found = response.json()
        if not isinstance(found, list):
            raise ValueError("GET /slots answered no list")
        # A slot that never took a prompt has no n_prompt_tokens (or 0): nothing to save.
        return [
            s["id"]
            for s in found
            if isinstance(s, dict) and isinstance(s.get("id"), int) and s.get("n_prompt_tokens", 1) != 0
        ]

    async def _post(self, port: int, slot: int, action: str, file_name: str) -> dict[str, object]:
        response = await self.http.post(
            f"http://127.0.0.1:{port}/slots/{slot}", params={"action": action}, json={"filename": file_name}
        )
        response.raise_for_status()
        answer = response.json()
        return answer if isinstance(answer, dict) else {}


def gib_bytes(gib: float) -> int:
    return int(gib * _GIB)
