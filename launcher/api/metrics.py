"""Prometheus metrics, collected from the manager at each scrape (nothing is kept between scrapes).

Base units and `_ratio` for fractions, as nvidia_gpu_exporter does; GPU labels as dcgm-exporter names
them (`gpu`, `UUID`, `pci_bus_id`, `modelName`), so existing dashboards need little change.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from launcher.schema_instances import State
from launcher.supervise.manager import Manager
from launcher.supervise.server_metrics import ServerMetrics
from launcher.supervise.server_series import merged

_MIB = 1024 * 1024


class LauncherCollector(Collector):
    def __init__(self, manager: Manager) -> None:
        self._manager = manager

    def collect(self) -> Iterator[Metric]:
        yield from self._instances()
        yield from self._gpus()
        peers = GaugeMetricFamily("launcher_peer_up", "1 when the peer answered its last read", labels=["peer"])
        for peer in self._manager.peers.statuses() if self._manager.peers is not None else []:
            peers.add_metric([peer.name], 1.0 if peer.reachable else 0.0)
        yield peers
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
        yield from self._plan_checks()

    def _plan_checks(self) -> Iterator[Metric]:
        """Each ready server's plan against what it reports allocating, per device (as the server names it)."""
        actual = GaugeMetricFamily(
            "launcher_plan_actual_mib",
            "MiB the server reports allocating, per device and term (weights, kv, state, compute, output, "
            "other; process: what the GPU reading says its process holds)",
            labels=["instance", "device", "term"],
        )
        error = GaugeMetricFamily(
            "launcher_plan_error_mib",
            "actual minus planned MiB per device (above zero: the plan was short)",
            labels=["instance", "device"],
        )
        for status in self._manager.statuses():
            for device in status.actual.devices if status.actual is not None else []:
                for term, found in device.terms.items():
                    actual.add_metric([status.name, device.device, term], found.actual_mib)
                if device.process_mib is not None:
                    actual.add_metric([status.name, device.device, "process"], float(device.process_mib))
                error.add_metric([status.name, device.device], device.difference_mib)
        yield from (actual, error)

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
            "pcie_tx": gauge("pcie_tx_bytes_per_second", "what the GPU sends over PCIe"),
            "pcie_rx": gauge("pcie_rx_bytes_per_second", "what the GPU receives over PCIe"),
        }
        age = gauge("sample_age_seconds", "time since the GPU's last reading: the sampler is stale when it grows")
        link_labels = [*labels, "link", "peer", "kind"]
        links = {
            "up": GaugeMetricFamily("launcher_gpu_link_up", "1 when the NVLink/xGMI link is up", labels=link_labels),
            "speed": GaugeMetricFamily(
                "launcher_gpu_link_speed_bytes_per_second", "the speed the link runs at", labels=link_labels
            ),
            "tx": GaugeMetricFamily("launcher_gpu_link_tx_bytes_per_second", "what the link sends", labels=link_labels),
            "rx": GaugeMetricFamily(
                "launcher_gpu_link_rx_bytes_per_second", "what the link receives", labels=link_labels
            ),
        }
        now = time.time()
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
                "pcie_tx": s.pcie_tx_bytes_per_second,
                "pcie_rx": s.pcie_rx_bytes_per_second,
            }
            age.add_metric(values, max(0.0, now - s.time))
            for key, value in readings.items():
                if value is not None and s.error is None:
                    families[key].add_metric(values, float(value))
            for link in s.links if s.error is None else ():
                link_values = [*values, str(link.link), link.peer or "", link.kind]
                speed = None if link.speed_mbps is None else link.speed_mbps * 1e6
                for key, reading in (
                    ("up", 1.0 if link.up else 0.0),
                    ("speed", speed),
                    ("tx", link.tx_bytes_per_second),
                    ("rx", link.rx_bytes_per_second),
                ):
                    if reading is not None:
                        links[key].add_metric(link_values, float(reading))
        yield from families.values()
        yield age
        yield from links.values()


# The daemon's own series about the servers' reads, under the prefix the servers' series get too.
_SERVER_UP = "launcher_server_metrics_up"
_SERVER_AGE = "launcher_server_metrics_age_seconds"


class ServerSeriesCollector(Collector):
    """The servers' own series, from the cache ``server_metrics`` keeps: a scrape never asks a server."""

    def __init__(self, server_metrics: ServerMetrics) -> None:
        self._server_metrics = server_metrics

    def collect(self) -> Iterator[Metric]:
        cache = self._server_metrics.series()
        labels = ["model", "instance"]
        up = GaugeMetricFamily(_SERVER_UP, "1 when the last read of the server's /metrics succeeded", labels=labels)
        age = GaugeMetricFamily(
            _SERVER_AGE,
            "how old the server's series shown are: time since its /metrics was last read",
            labels=labels,
        )
        now = time.time()
        for name, kept in cache.items():
            up.add_metric([kept.model, name], 0.0 if kept.error else 1.0)
            if kept.read_at is not None:
                age.add_metric([kept.model, name], max(0.0, now - kept.read_at))
        yield up
        yield age
        yield from merged((kept.families for kept in cache.values()), reserved={_SERVER_UP, _SERVER_AGE})
