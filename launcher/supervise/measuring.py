"""What running servers measured, kept and found again (issue 23 point 3); owns STATE_DIR/measured.json.

A measurement is filed under a key of everything that changes what a server allocates: the model file's
identity (its path, size and modification time), the projector's (--mmproj), the server binary's (its
version: a new build is a new file), the backend, the context and every argument and environment
variable the model passes. Anything in it changed: another key, so the plan falls back to the estimate.
Where the placement differs (other GPUs, another split), launcher/plan/measured.py keeps the estimate.

The driver's share of a GPU (the server process's memory as NVML reads it, less its buffers) is kept
per GPU name and driver version and replaces gpus.overhead_mib for that GPU in later plans.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from launcher.backends.base import local_projector
from launcher.config_model import ModelSettings
from launcher.gpu.types import GpuIdentity
from launcher.hub_ref import HubRef
from launcher.plan.measured import Measurement, driver_share_mib, measurement_of
from launcher.schema_plans import Plan, PlanCheck
from launcher.server_args import MMPROJ, arg_value
from launcher.statedir.measurements import MeasurementStore, overhead_key

MEASURED_BACKEND = "llama-server"  # the one backend whose check reads its buffers


def _identity(path: Path) -> list[object]:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _projector(model: ModelSettings) -> object:
    """A projector by its file's identity; a hub one by the file its reference resolves to in the cache
    now (pulled at main: a new commit there is another file), by the reference while it is not there."""
    projector = arg_value(model.args, *MMPROJ) or model.mmproj
    if isinstance(projector, HubRef):
        local = local_projector(model)
        return _identity(local) if local is not None else str(projector)
    return projector and _identity(Path(projector))


def measurement_key(model: ModelSettings, model_file: Path, binary: Path) -> str:
    """The key of a model's measurements (it reads the files' metadata: call it off the event loop)."""
    facts = {
        "backend": model.backend,
        "model": _identity(model_file),
        "mmproj": _projector(model),
        "server": _identity(binary),
        "split_mode": model.split_mode,
        "ctx": model.ctx,
        "args": model.args,
        "env": model.env,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]


class Measuring:
    def __init__(self, store: MeasurementStore, identities: Sequence[GpuIdentity]) -> None:
        self._store = store
        self.path = store.path
        self._identities = {g.index: g for g in identities}

    def lookup(self, model: ModelSettings, model_file: Path | None, binary: Path) -> Measurement | None:
        """What an earlier run measured with the same key (in a planning thread: it reads the disk)."""
        if model.backend != MEASURED_BACKEND or model_file is None:
            return None
        try:
            return self._store.get(measurement_key(model, model_file, binary))
        except OSError:  # a file gone meanwhile: the start will say so; the estimate meanwhile
            return None

    def overheads_mib(self) -> dict[int, int]:
        """The driver's share learned for each of this host's GPUs (by its name and driver), by index."""
        try:
            learned = self._store.overheads_mib()
        except OSError:  # a state file that cannot be read (a directory, no permission): the defaults
            return {}
        return {
            index: learned[key]
            for index, gpu in self._identities.items()
            if gpu.driver is not None and (key := overhead_key(gpu.name, gpu.driver)) in learned
        }

    def record(
        self, name: str, model: ModelSettings, model_file: Path, binary: Path, plan: Plan, check: PlanCheck
    ) -> Measurement | None:
        """Keep what a ready server measured (in a worker thread: it writes the state directory)."""
        date = datetime.now().astimezone().isoformat(timespec="seconds")
        measurement = measurement_of(name, plan, check, date)
        if measurement is None or model.backend != MEASURED_BACKEND:
            return None
        self._store.put(measurement_key(model, model_file, binary), measurement)
        for index, share_mib in driver_share_mib(measurement).items():
            gpu = self._identities.get(index)
            if gpu is not None and gpu.driver is not None:
                self._store.put_overhead(gpu.name, gpu.driver, share_mib)
        return measurement
