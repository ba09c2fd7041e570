"""One instance's saved prompt caches (of llama-server's slots): the directory its command line names, the
key of its current start's caches, their save at a planned stop and their restore before ready.

Which cache fits a start is slot_cache.py's (pure); the files and the server's HTTP API are slot_store.py's.
"""

from __future__ import annotations

from dataclasses import replace

from launcher.backends import LaunchSpec
from launcher.config_model import ModelSettings
from launcher.supervise import slot_cache
from launcher.supervise.record import InstanceRecord
from launcher.supervise.slot_store import SlotStore, gib_bytes


class PromptCaches:
    def __init__(self, name: str, store: SlotStore | None, record: InstanceRecord) -> None:
        """``store``: where the daemon's servers save their caches; None: they save none."""
        self._name = name
        self._store = store
        self._record = record
        # The key of the current start's caches (slot_cache.py); None: it saves and restores none.
        self._key: str | None = None

    def command(self, spec: LaunchSpec, backend_name: str, settings: ModelSettings) -> LaunchSpec:
        """``spec`` (the backend's) as this instance runs it: a llama-server's with the directory its slots'
        prompt caches are saved in; unchanged when it saves none (or its args name their own directory)."""
        if (
            self._store is None
            or backend_name != "llama-server"
            or settings.kv_cache_max_gib <= 0
            or slot_cache.SAVE_PATH_FLAG in spec.argv
        ):
            return spec
        return replace(spec, argv=[*spec.argv, slot_cache.SAVE_PATH_FLAG, str(self._store.directory(self._name))])

    def for_start(self, base: LaunchSpec, backend_name: str, settings: ModelSettings) -> LaunchSpec:
        """``base`` with the directory of the slots' prompt caches (`command`), made, and the key of this
        start's caches taken; ``base`` itself when it keeps none."""
        spec = self.command(base, backend_name, settings)
        self._key = None if spec is base else self._prepare(spec)
        return spec if self._key is not None else base

    def _prepare(self, spec: LaunchSpec) -> str | None:
        """The directory of the slots' prompt caches made, and the key of this start's; None when it cannot
        be made (the start goes on without)."""
        assert self._store is not None  # `command` added its directory
        try:
            return self._store.prepare(self._name, spec.argv, spec.env)
        except OSError as exc:
            self._record.emit("kv-cache", f"prompt caches not kept: {exc}")
            return None

    async def save(self, port: int | None, settings: ModelSettings) -> None:
        """Save the slots' prompt caches, half the stop timeout at most: the halt that follows has the rest."""
        store, key = self._store, self._key
        if store is None or key is None or port is None:
            return
        budget_s = settings.stop_timeout / 2
        said = await store.save(self._name, port, key, budget_s, gib_bytes(settings.kv_cache_max_gib))
        self._record.emit("kv-cache", said)

    async def restore(self, port: int | None, settings: ModelSettings) -> None:
        """Before a ready server is marked ready: the prompt caches a planned stop of the same model with
        the same settings saved, so its first request does not compute its prompt again."""
        store, key = self._store, self._key
        if store is None or key is None or port is None:
            return
        said = await store.restore(self._name, port, key, settings.health.load_timeout)
        if said is not None:
            self._record.emit("kv-cache", said)
