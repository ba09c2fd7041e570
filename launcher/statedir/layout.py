"""Where each file of a state directory is: the one place its layout is spelled.

STATE_DIR/daemon.lock      the owner record, locked by the daemon that owns the directory (owner.py)
STATE_DIR/children.json    the servers that daemon runs (children.py)
STATE_DIR/handover.json    what an upgrade's old program hands its new one (supervise/handover.py)
STATE_DIR/logs/NAME.log    each instance's server output, NAME.log.1.. its rotated copies (logs.py)
STATE_DIR/kv-cache/NAME/   llama-server slots' saved prompt caches (supervise/slot_store.py)
STATE_DIR/measured.json   what running servers measured, and the driver's share per GPU (measurements.py)
STATE_DIR/daemon.log       the output of a daemon `launcher up --detach` started in the background
STATE_DIR/hub-headers/ORG--REPO/COMMIT/FILE.header
                           the start of a hub model's file, its GGUF header (launcher/hub/headers.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StateDir:
    """A state directory's files, by what they hold. Naming a path creates nothing."""

    root: Path

    @property
    def lock_file(self) -> Path:
        return self.root / "daemon.lock"

    @property
    def children_file(self) -> Path:
        return self.root / "children.json"

    @property
    def handover_file(self) -> Path:
        return self.root / "handover.json"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def server_log(self, instance: str) -> Path:
        """The log file of the instance ``instance`` (a configured name, checked to be a file name)."""
        return self.logs_dir / f"{instance}.log"

    @property
    def hub_headers_dir(self) -> Path:
        return self.root / "hub-headers"

    @property
    def measured_file(self) -> Path:
        return self.root / "measured.json"

    @property
    def kv_cache_dir(self) -> Path:
        """The slots' saved prompt caches, a directory per instance (supervise/slot_store.py)."""
        return self.root / "kv-cache"

    @property
    def daemon_log(self) -> Path:
        return self.root / "daemon.log"
