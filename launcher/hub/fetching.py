"""The files of a hub model's plan pulled into the cache (download.py), with the progress the daemon, the
API and the CLI show: bytes done and total, the rate over the last seconds and the time left."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from launcher.config_file import read_token
from launcher.config_hub import HubSettings
from launcher.config_model import ModelSettings
from launcher.hub.cache import missing
from launcher.hub.download import PullProgress, disk_free_bytes, pull
from launcher.hub.headers import HubError, HubReader
from launcher.hub.repo import HubFile
from launcher.hub_ref import HubRef
from launcher.schema_instances import Download
from launcher.schema_plans import HubPlan

_RATE_WINDOW_S = 5.0


class RateMeter:
    """Progress readings turned into a `Download`: the rate over the last few seconds, and the time left."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._readings: deque[tuple[float, int]] = deque()

    def reading(self, progress: PullProgress) -> Download:
        now = self._clock()
        self._readings.append((now, progress.done_bytes))
        while len(self._readings) > 2 and now - self._readings[0][0] > _RATE_WINDOW_S:
            self._readings.popleft()
        first_s, first_bytes = self._readings[0]
        rate = (progress.done_bytes - first_bytes) / (now - first_s) if now > first_s else 0.0
        left = max(progress.total_bytes - progress.done_bytes, 0)
        return Download(
            done_bytes=progress.done_bytes,
            total_bytes=progress.total_bytes,
            rate_bytes_s=round(rate, 1),
            eta_s=round(left / rate, 1) if rate > 0 else (0.0 if left == 0 else None),
            file=progress.file,
        )


def pull_planned(
    hub: HubPlan,
    model: ModelSettings,
    settings: HubSettings,
    headers_dir: Path,
    cache: Path,
    on_progress: Callable[[Download], None],
    cancelled: threading.Event | None = None,
    free_bytes: Callable[[Path], int] = disk_free_bytes,
) -> list[Path]:
    """Download the files ``hub`` (a plan's) names at its commit, and ``model``'s projector when it is on
    the hub (`mmproj: hf:...`, at main); the paths of the model's files in the snapshot."""
    token = read_token(settings.token_file, "hub.token_file")
    reader = HubReader(headers_dir, token, settings.max_header_mib * 1024 * 1024)
    listing = reader.listing(hub.repo, hub.commit)
    by_path = {f.path: f for f in listing.files}
    if any(path not in by_path for path in hub.files):
        raise HubError(f"{hub.repo} at {hub.commit[:12]} no longer lists the files planned", hint="plan it again")

    # The projector (`mmproj: hf:...`, at main) is found first, so that one progress covers both pulls.
    projector = model.mmproj
    projector_pull: tuple[str, str, list[HubFile]] | None = None  # repo, commit, files
    if isinstance(projector, HubRef) and projector.file is not None:
        projector_listing = reader.listing(projector.repo, None)
        found = [f for f in projector_listing.files if f.path == projector.file]
        if not found:
            raise HubError(f"mmproj: {projector.file} is not a GGUF file in {projector.repo} at main")
        projector_pull = (projector.repo, projector_listing.commit, found)
    model_files = [by_path[path] for path in hub.files]
    meter = RateMeter()  # one over both pulls: the bytes done and the total are the model's and the projector's

    def left(repo: str, commit: str, files: list[HubFile]) -> int:
        return sum(f.size_bytes for f in missing(repo, commit, tuple(files), cache))

    def fetch(repo: str, revision: str, commit: str, files: list[HubFile], before: int, after: int) -> list[Path]:
        def shown(progress: PullProgress) -> None:
            whole = PullProgress(before + progress.done_bytes, before + progress.total_bytes + after, progress.file)
            on_progress(meter.reading(whole))

        return pull(repo, revision, commit, files, cache=cache, token=token, cancelled=cancelled,
                    on_progress=shown, free_bytes=free_bytes)  # fmt: skip

    model_left = left(hub.repo, hub.commit, model_files)
    projector_left = left(*projector_pull) if projector_pull is not None else 0
    paths = fetch(hub.repo, hub.revision, hub.commit, model_files, 0, projector_left)
    if projector_pull is not None:
        fetch(projector_pull[0], "main", projector_pull[1], projector_pull[2], model_left, 0)
    return paths
