"""A download or an Ollama pull before a start is never begun for an instance that starts no server any more:
the daemon is stopping (`close`), or a reload removed it. Retired before the start, or while the start
planned (reading headers from the hub can take seconds): before, the download began after the stop had
found nothing to end, and ran on for a model nobody could stop any more."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from launcher.backends import backend_for
from launcher.config_file import load_settings
from launcher.config_gpus import GpuSettings
from launcher.config_hub import HubSettings
from launcher.errors import ConflictError
from launcher.schema_instances import Event, State
from launcher.schema_plans import HubPlan, Plan
from launcher.statedir.owner import StateDirLock
from launcher.supervise.downloads import begin_download
from launcher.supervise.instance import Instance
from launcher.supervise.leftovers import ChildRegistry
from launcher.supervise.ollama_downloads import begin_ollama_pull
from launcher.supervise.parts import DaemonParts
from launcher.supervise.table import RequestLoad
from launcher.supervise.vram import VramGate
from launcher.supervise.writes import StateWrites
from tests.conftest import ConfigWriter

_HUB = HubPlan(
    reference="hf:org/x-GGUF:F16", repo="org/x-GGUF", revision="main", commit="0" * 40,
    files=["x-F16.gguf"], size_bytes=1, header_bytes=1, fetched_bytes=1,
)  # fmt: skip


class _NoReadings:
    def latest(self) -> list[object]:
        return []


@pytest.fixture
async def instances(
    tmp_path: Path, write_config: ConfigWriter, ollama_standin: Path
) -> AsyncIterator[dict[str, Instance]]:
    """A hub model not in the cache and an Ollama model not in its store, made but not started."""
    settings = load_settings(
        write_config({
            "hub": {"model": "hf:org/x-GGUF:F16"},
            "ollama": {
                "backend": "ollama", "model": "x:1b", "binary": str(ollama_standin),
                "ollama": {"models_dir": str(tmp_path / "store")},
            },
        })
    )  # fmt: skip
    lock = StateDirLock.claim(tmp_path / "state", "http://127.0.0.1:1")
    events: list[Event] = []
    try:
        async with httpx.AsyncClient() as http:
            parts = DaemonParts(
                http=http, state_dir=lock.state_dir, registry=ChildRegistry(lock), log_max_bytes=2**20, log_keep=1,
                vram=VramGate(GpuSettings(), _NoReadings(), events.append),  # type: ignore[arg-type]
                on_event=events.append, writes=StateWrites(), requests=RequestLoad(),
            )  # fmt: skip
            yield {
                name: Instance(name, model, backend=backend_for(model, settings.rpc), parts=parts)
                for name, model in settings.models.items()
            }
    finally:
        lock.release()


def _fitting(instance: Instance, retire_while_planning: bool) -> Callable[[], Awaitable[Plan]]:
    async def plan() -> Plan:
        if retire_while_planning:
            instance.retire("the daemon is stopping")
        return Plan.model_construct(model=instance.name, fits=True, reason=None, suggestions=[], hub=_HUB)

    return plan


async def _begin(instance: Instance, plan: Callable[[], Awaitable[Plan]], headers_dir: Path) -> bool:
    if instance.name == "hub":
        return await begin_download(instance, plan, HubSettings(), headers_dir, lambda: None)
    return await begin_ollama_pull(instance, 1, plan, lambda: None)


@pytest.mark.parametrize("retire_while_planning", [False, True], ids=["retired-before", "retired-while-planning"])
@pytest.mark.parametrize("name", ["hub", "ollama"])
async def test_a_retired_instance_begins_no_download(
    instances: dict[str, Instance], name: str, retire_while_planning: bool, tmp_path: Path
) -> None:
    instance = instances[name]
    if not retire_while_planning:
        instance.retire("the daemon is stopping")
    try:
        with pytest.raises(ConflictError, match="does not start: the daemon is stopping"):
            await _begin(instance, _fitting(instance, retire_while_planning), tmp_path / "headers")
        assert not instance.downloading and instance.state != State.DOWNLOADING
    finally:
        if instance.downloading:  # before the fix: the download it began, ended with the test
            await instance.stop()
