"""Prometheus metrics, collected from the manager at each scrape (nothing is kept between scrapes).

Base units and `_ratio` for fractions, as nvidia_gpu_exporter does; GPU labels as dcgm-exporter names
them (`gpu`, `UUID`, `pci_bus_id`, `modelName`), so existing dashboards need little change.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from launcher.schema import State
from launcher.supervise.manager import Manager

_MIB = 1024 * 1024


class LauncherCollector(Collector):
    def __init__(self, manager: Manager) -> None:
        self._manager = manager

    def collect(self) -> Iterator[Metric]:
        yield from self._instances()
        yield from self._gpus()
        writes = CounterMetricFamily(
            "launcher_state_write_errors",
            "writes to the state directory (log lines, the child registry) that failed and were dropped",
        )
        writes.add_metric([], float(self._manager.writes.failed_total))
        yield writes

    def _instances(self) -> Iterator[Metric]:
        labels = ["instance", "group", "backend"]
        up = GaugeMetricFamily("launcher_instance_ready", "1 when the instance is ready to serve", labels=labels)
        state = GaugeMetricFamily(
            "launcher_instance_state", "1 for the instance's current state", labels=[*labels, "state"]
        )
        restarts = CounterMetricFamily(
            "launcher_instance_restarts", "automatic restarts since the daemon started", labels=labels
        )
        vram = GaugeMetricFamily(
            "launcher_instance_vram_planned_bytes", "GPU memory the instance's plan takes", labels=labels
        )
        served = GaugeMetricFamily(
            "launcher_instance_model_bytes",
            "model size the server reports, by where it sits",
            labels=[*labels, "where"],
        )
        split = GaugeMetricFamily(
            "launcher_instance_split_mode",
            "1 for how the instance's plan divides the model over its devices (layer, tensor)",
            labels=[*labels, "mode"],
        )
        for status in self._manager.statuses():
            values = [status.name, status.group, status.backend]
            if status.plan is not None:
                split.add_metric([*values, status.plan.split_mode], 1.0)
            up.add_metric(values, 1.0 if status.state == State.READY else 0.0)
            for each in State:
                state.add_metric([*values, each.value], 1.0 if status.state == each else 0.0)
            restarts.add_metric(values, float(status.restarts))
            vram.add_metric(values, float((status.vram_mib or 0) * _MIB))
            info = status.server_info
            if "size_bytes" in info:
                served.add_metric([*values, "total"], float(info["size_bytes"]))
                served.add_metric([*values, "gpu"], float(info.get("size_vram_bytes", 0)))
        yield from (up, state, restarts, vram, served, split)

    def _gpus(self) -> Iterator[Metric]:
        labels = ["gpu", "UUID", "pci_bus_id", "modelName"]

        def gauge(name: str, text: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"launcher_gpu_{name}", text, labels=labels)

        families = {
            "up": gauge("up", "1 when the GPU could be read at the last poll"),
            "used": gauge("memory_used_bytes", "GPU memory in use"),
            "free": gauge("memory_free_bytes", "GPU memory free"),
            "total": gauge("memory_total_bytes", "GPU memory in all"),
            "temp": gauge("temperature_celsius", "GPU temperature"),
            "util": gauge("utilization_ratio", "GPU utilisation, 0 to 1"),
            "power": gauge("power_watts", "GPU power draw"),
        }
        for s in self._manager.gpu_samples():
            values = [str(s.index), s.uuid, s.pci_bus_id or "", s.name]
            families["up"].add_metric(values, 0.0 if s.error else 1.0)
            readings = {
                "used": None if s.memory_used_mib is None else s.memory_used_mib * _MIB,
                "free": None if s.memory_free_mib is None else s.memory_free_mib * _MIB,
                "total": None if s.memory_total_mib is None else s.memory_total_mib * _MIB,
                "temp": s.temperature_c,
                "util": None if s.utilization_pct is None else s.utilization_pct / 100,
                "power": s.power_w,
            }
            for key, value in readings.items():
                if value is not None and s.error is None:
                    families[key].add_metric(values, float(value))
        yield from families.values()
