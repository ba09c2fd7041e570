"""The thermal guard: its verdicts exactly (a pure function of sample, hot GPUs and instances), and the
manager carrying them out on a real server (warn, or stop), fed hand-made samples: no clock involved."""

from __future__ import annotations

from typing import Any

from launcher.config_file import load_settings
from launcher.schema_gpus import GpuSample
from launcher.schema_instances import State
from launcher.supervise.thermal import ThermalVerdict, judge
from tests.conftest import ConfigWriter, OpenManager, OpenWired

LIMIT_C = 90.0


def sample(temperature_c: float | None, index: int = 0) -> GpuSample:
    return GpuSample(
        index=index, uuid=f"GPU-{index}", name="Sim 3090", pci_bus_id=None, vendor="nvidia", time=0.0,
        temperature_c=temperature_c,
    )  # fmt: skip


def test_cool_or_unreadable_says_nothing() -> None:
    assert judge(sample(89.9), frozenset(), ["a"], LIMIT_C, "warn") == ThermalVerdict(frozenset())
    assert judge(sample(None), frozenset({0}), ["a"], LIMIT_C, "stop") == ThermalVerdict(frozenset({0}))


def test_a_crossing_is_told_once_naming_gpu_limit_and_instances() -> None:
    verdict = judge(sample(90.0), frozenset({3}), ["a", "b"], LIMIT_C, "warn")
    assert verdict == ThermalVerdict(
        hot=frozenset({0, 3}),
        message="Sim 3090 at 90 °C, at or above the 90 °C limit; running on it: a, b",
        stop=(),
        warned=("a", "b"),
    )
    assert judge(sample(99.0), verdict.hot, ["a", "b"], LIMIT_C, "warn") == ThermalVerdict(verdict.hot)


def test_the_episode_ends_five_degrees_below_the_limit() -> None:
    hot = frozenset({0})
    assert judge(sample(85.1), hot, ["a"], LIMIT_C, "warn") == ThermalVerdict(hot)
    assert judge(sample(85.0), hot, ["a"], LIMIT_C, "warn") == ThermalVerdict(frozenset(), "Sim 3090 back to 85 °C")


def test_stop_names_what_it_stops() -> None:
    verdict = judge(sample(95.0), frozenset(), ["a"], LIMIT_C, "stop")
    assert verdict.message == "Sim 3090 at 95 °C, at or above the 90 °C limit; stopping a"
    assert verdict.stop == ("a",)
    idle = judge(sample(95.0), frozenset(), [], LIMIT_C, "stop")
    assert idle.message == "Sim 3090 at 95 °C, at or above the 90 °C limit; running on it: no instance"
    assert idle.stop == ()
    # Still hot: nothing new is told, but what runs there now is stopped (warn leaves it).
    assert judge(sample(93.0), idle.hot, ["late"], LIMIT_C, "stop") == ThermalVerdict(idle.hot, stop=("late",))
    assert judge(sample(93.0), idle.hot, ["late"], LIMIT_C, "warn") == ThermalVerdict(idle.hot)


SIM_GPUS: dict[str, Any] = {"backend": "sim", "sim": [{"name": "Sim 3090", "memory_mib": 24576}]}


async def test_the_manager_warns_the_instance_and_keeps_it(write_config: ConfigWriter, open_wired: OpenWired) -> None:
    wired = await open_wired(load_settings(write_config(gpus=SIM_GPUS)))
    manager = wired.manager
    instance = manager.get("tiny")
    await manager.start("tiny")
    await instance.wait_until(lambda i: i.state == State.READY, 60)
    manager.observe(sample(93.0))
    [event] = [e for e in wired.events.recent(500) if e.kind == "thermal" and e.instance is None]  # the GPU's own
    assert (event.gpu, event.message) == (0, "Sim 3090 at 93 °C, at or above the 90 °C limit; running on it: tiny")
    assert [e.message for e in instance.events if e.kind == "thermal"] == [f"GPU 0: {event.message}"]
    assert instance.state == State.READY


async def test_the_manager_stops_the_instances_of_a_hot_gpu(
    write_config: ConfigWriter, open_manager: OpenManager
) -> None:
    gpus = {**SIM_GPUS, "thermal_action": "stop"}
    manager = await open_manager(load_settings(write_config(gpus=gpus)))
    instance = manager.get("tiny")
    await manager.start("tiny")
    await instance.wait_until(lambda i: i.state == State.READY, 60)
    manager.observe(sample(95.0))
    await instance.wait_until(lambda i: i.state == State.STOPPED, 30)
    assert instance.status().last_exit == "exited with code 0"  # llama-server ends cleanly on SIGTERM


async def test_the_sampler_feeds_the_guard_a_server_started_on_a_hot_gpu_is_stopped(
    write_config: ConfigWriter, open_wired: OpenWired
) -> None:
    # The GPU is hot from its first reading on: the episode begins with no instance on it; the server
    # started during it is stopped at the next reading (poll 0.1 s). No temperature script, no clock.
    hot = {**SIM_GPUS, "poll_interval": 0.1, "thermal_action": "stop"}
    hot["sim"] = [{**SIM_GPUS["sim"][0], "temperature_c": 95}]
    wired = await open_wired(load_settings(write_config(gpus=hot)))
    manager = wired.manager
    instance = manager.get("tiny")
    await manager.start("tiny")
    await instance.wait_until(lambda i: i.state == State.STOPPED, 30)
    [event] = [e for e in wired.events.recent(500) if e.kind == "thermal"]
    assert event.message == "Sim 3090 at 95 °C, at or above the 90 °C limit; running on it: no instance"
