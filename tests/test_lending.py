"""The lending book (launcher/supervise/lending.py) through its interface, with instances that are made but
not started (their placements stand for the plans they would run with) and GPU readings set by the test.
Claims taken on a ready rpc-server are in test_rpc_peers.py, with real daemons."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from launcher.backends import backend_for
from launcher.config_file import load_settings
from launcher.config_gpus import GpuSettings
from launcher.errors import NotFoundError
from launcher.rpc.claims import ClaimBook
from launcher.schema_gpus import GpuSample
from launcher.schema_instances import Event
from launcher.schema_rpc import ClaimDevice, ClaimRequest, RpcReport
from launcher.statedir.owner import StateDirLock
from launcher.supervise.instance import Instance
from launcher.supervise.leftovers import ChildRegistry
from launcher.supervise.lending import Lending, claims_total
from launcher.supervise.parts import DaemonParts
from launcher.supervise.table import RequestLoad
from launcher.supervise.vram import VramGate
from launcher.supervise.writes import StateWrites
from tests.conftest import ConfigWriter, gpu_sample

_GPUS = GpuSettings(margin_mib=10, reserve_mib={0: 5})


class Readings:
    def __init__(self, *samples: GpuSample) -> None:
        self.samples = list(samples)

    def latest(self) -> list[GpuSample]:
        return self.samples

    async def read_now(self, indices: object) -> None:
        raise AssertionError("the lending book never asks for a reading")


@pytest.fixture
async def instances(tmp_path: Path, write_config: ConfigWriter) -> AsyncIterator[dict[str, Instance]]:
    """Instances ``a`` and ``b``, stopped, with what the daemon hands every instance."""
    settings = load_settings(write_config({"a": {}, "b": {}}))
    lock = StateDirLock.claim(tmp_path / "state", "http://127.0.0.1:1")
    events: list[Event] = []
    try:
        async with httpx.AsyncClient() as http:
            parts = DaemonParts(
                http=http,
                state_dir=lock.state_dir,
                registry=ChildRegistry(lock),
                log_max_bytes=2**20,
                log_keep=1,
                vram=VramGate(_GPUS, Readings(), events.append),
                on_event=events.append,
                writes=StateWrites(),
                requests=RequestLoad(),
            )
            yield {
                name: Instance(name, model, backend=backend_for(model, settings.rpc), parts=parts)
                for name, model in settings.models.items()
            }
    finally:
        lock.release()


def test_the_sum_adds_each_gpus_claims() -> None:
    assert claims_total([{0: 1}, {0: 2, 1: 3}, {}]) == {0: 3, 1: 3}
    assert claims_total([]) == {}


def test_what_is_claimed_counts_the_instances_passed_in(instances: dict[str, Instance]) -> None:
    a, b = instances["a"], instances["b"]
    a.placement = replace(a.placement, claims_mib={0: 300, 1: 100})
    b.placement = replace(b.placement, claims_mib={0: 200})
    lending = Lending(instances, Readings(), _GPUS, ClaimBook())
    assert lending.claimed_mib([a, b]) == {0: 500, 1: 100}
    assert lending.claimed_mib([b]) == {0: 200}
    assert lending.claimed_mib(()) == {}  # no peer holds a claim


def test_what_may_be_lent_is_each_readable_gpu_less_the_margin_and_its_reserve(
    instances: dict[str, Instance],
) -> None:
    a = instances["a"]
    a.placement = replace(a.placement, claims_mib={0: 300})  # not started: not counted
    readings = Readings(
        gpu_sample(0, 900), gpu_sample(1, 1000), gpu_sample(2, 1000, error="the driver is not answering")
    )
    lending = Lending(instances, readings, _GPUS, ClaimBook())
    assert lending.usable_mib() == {0: 885, 1: 990}


def test_a_claim_needs_a_ready_rpc_server_at_its_endpoint(instances: dict[str, Instance]) -> None:
    lending = Lending(instances, Readings(gpu_sample(0, 1000)), _GPUS, ClaimBook())
    assert lending.endpoint_gpus() == {}  # llama-servers lend nothing
    request = ClaimRequest(
        holder="http://b:8400#big", endpoint="h:1", devices=[ClaimDevice(gpu=0, memory_mib=1)], ttl_s=5
    )
    with pytest.raises(NotFoundError) as refused:
        lending.claim(request)
    assert (refused.value.message, refused.value.hint) == ("no ready rpc-server at h:1", "ready endpoints: none")
    assert not lending.release("http://b:8400#big")
    assert lending.report() == RpcReport(endpoints=[])
