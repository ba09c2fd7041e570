"""What `launcher doctor` says (a Finding per check) and what it looks at (the Machine)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from launcher.gpu.types import Link
from launcher.schema_gpus import GpuSample

Level = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Finding:
    level: Level
    check: str
    message: str
    fix: str | None = None


@dataclass(frozen=True)
class Machine:
    """What doctor looks at: the GPUs as read now, and where the driver's device files live."""

    gpus: list[GpuSample]
    links: dict[tuple[int, int], Link]
    backend: str  # which GPU backend and why
    simulated: bool
    dev_root: Path = Path("/dev")
    drm_root: Path = Path("/sys/class/drm")
