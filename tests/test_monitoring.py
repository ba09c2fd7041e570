"""monitoring/: the alerting rules (promtool's check and unit tests), the PrometheusRule and the Grafana
dashboard as Kubernetes and compose ship them, the dashboard against Grafana's types, and a real
Prometheus (Debian's package) scraping a real daemon: the servers' own series per model, the GPU links,
the front door's series, every PromQL expression of the dashboard, a stopped model dropping out and an
on-demand model never woken by a scrape."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import ConfigWriter, Daemon, free_port, poll_until, stop_process

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"
DASHBOARD = MONITORING / "launcher-dashboard.json"
RULES = MONITORING / "alerts.yaml"
# Series the daemon of the Prometheus test may not make, and why: the dashboard's expressions over them
# must still parse there (an empty answer, not an error).
NOT_MADE_HERE = {"launcher_plan_error_mib": "the plan check's series (issue 23), from servers run at -lv 4"}


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (Debian's prometheus package; scripts/setup installs it where it can)")
    return found


def dashboard_expressions() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


def test_rules_pass_promtool_check_and_unit_tests() -> None:
    promtool = _tool("promtool")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        [promtool, "test", "rules", "alerts-test.yaml"], cwd=MONITORING, capture_output=True, text=True, timeout=60
    )
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr


def test_every_alert_has_unit_tests_that_fire_it_and_keep_it_silent() -> None:
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    cases = [
        case
        for test in yaml.safe_load((MONITORING / "alerts-test.yaml").read_text())["tests"]
        for case in test["alert_rule_test"]
    ]
    fired = {case["alertname"] for case in cases if case["exp_alerts"]}
    silent = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert fired == alerts and silent == alerts
    plan = next(
        r
        for g in yaml.safe_load(RULES.read_text())["groups"]
        for r in g["rules"]
        if r["alert"] == "LauncherPlanExceeded"
    )
    assert "launcher_plan_error_mib" in plan["expr"]


def test_the_prometheusrule_carries_the_rules_file() -> None:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_kubernetes_ships_the_dashboard_and_the_rules() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize` renders the overlays")
    for overlay in ("nvidia", "amd"):
        rendered = subprocess.run(
            [kubectl, "kustomize", str(ROOT / "kubernetes" / "overlays" / overlay)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert rendered.returncode == 0, rendered.stderr
        docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
        (board,) = [d for d in docs if d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"]["labels"]]
        assert json.loads(board["data"]["launcher-dashboard.json"]) == json.loads(DASHBOARD.read_text())
        (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
        assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
        (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
        assert monitor["spec"]["endpoints"][0]["honorLabels"] is True  # our `instance` label kept


def test_compose_provisions_prometheus_and_grafana() -> None:
    docker = ROOT / "docker"
    services = yaml.safe_load((docker / "compose.monitoring.yaml").read_text())["services"]
    mounted = {
        target: (docker / source).resolve()
        for service in services.values()
        for source, target, *_ in (volume.split(":") for volume in service["volumes"])
        if source.startswith(".")
    }
    for source in mounted.values():
        assert source.is_file(), source
    assert mounted["/etc/prometheus/alerts.yaml"] == RULES
    prometheus = yaml.safe_load((docker / "prometheus.yml").read_text())
    assert prometheus["rule_files"] == ["/etc/prometheus/alerts.yaml"]
    assert prometheus["scrape_configs"][0]["honor_labels"] is True
    provider = yaml.safe_load((MONITORING / "grafana-dashboards.yaml").read_text())["providers"][0]
    assert mounted[f"{provider['options']['path']}/launcher-dashboard.json"] == DASHBOARD
    launchers = yaml.safe_load((docker / "compose.yaml").read_text())["services"]
    assert set(prometheus["scrape_configs"][0]["dns_sd_configs"][0]["names"]) == set(launchers)


def test_the_dashboard_is_valid_for_grafanas_types() -> None:
    """Decoded into grafana-foundation-sdk's Dashboard and encoded again, nothing is lost: every key we
    wrote is one of Grafana's, each panel's type is a known panel plugin, and each query a Prometheus one."""
    sdk = pytest.importorskip("grafana_foundation_sdk", reason="grafana-foundation-sdk (the dev extra) is missing")
    from grafana_foundation_sdk.cog import plugins
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard, Panel, RowPanel
    from grafana_foundation_sdk.models.prometheus import Dataquery

    del sdk
    plugins.register_default_plugins()
    written = json.loads(DASHBOARD.read_text())
    board = Dashboard.from_json(written)
    again = json.loads(json.dumps(board, cls=JSONEncoder))
    assert _lost(written, again) == []
    for panel in board.panels or []:
        assert isinstance(panel, Panel | RowPanel)
        for target in getattr(panel, "targets", None) or []:
            assert isinstance(target, Dataquery), target


def _lost(written: Any, again: Any, path: str = "") -> list[str]:
    """Where ``again`` (the SDK's encoding) lacks or changes what we wrote; what the SDK leaves out when
    empty or false is not lost, and what it adds (its defaults) does not count."""
    if isinstance(written, dict) and isinstance(again, dict):
        return [
            lost
            for key, value in written.items()
            if key in again or value not in ({}, [], "", None, False, 0)
            for lost in _lost(value, again.get(key), f"{path}.{key}")
        ]
    if isinstance(written, list) and isinstance(again, list) and len(written) == len(again):
        return [
            lost for i, (w, a) in enumerate(zip(written, again, strict=True)) for lost in _lost(w, a, f"{path}[{i}]")
        ]
    return [] if written == again else [f"{path}: {written!r} became {again!r}"]


# ---- a real Prometheus ----------------------------------------------------------------------------------


class Prometheus:
    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=10)

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = self.http.get("/api/v1/query", params={"query": expr}).json()
        assert answer["status"] == "success", (expr, answer)
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def label_values(self, expr: str, label: str) -> set[str]:
        return {series["metric"].get(label, "") for series in self.query(expr)}


@pytest.fixture
def prometheus_for(tmp_path: Path, marked_env: dict[str, str]) -> Iterator[Callable[[int], Prometheus]]:
    """A Prometheus on a free loopback port scraping the daemon on the given port every second, with the
    alerting rules loaded; its storage in tmp_path; stopped (and proven gone) at the end."""
    binary = _tool("prometheus")
    started: list[subprocess.Popen[str]] = []

    def start(daemon_port: int) -> Prometheus:
        port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {
                    "job_name": "launcher",
                    "honor_labels": True,
                    "static_configs": [{"targets": [f"127.0.0.1:{daemon_port}"]}],
                }
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            env=marked_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "prometheus.log").open("w"),
            text=True,
        )
        started.append(proc)
        url = f"http://127.0.0.1:{port}"
        poll_until(lambda: _ready(url), bool, "prometheus ready", 30)
        return Prometheus(url)

    yield start
    for proc in started:
        stop_process(proc, timeout=30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


LINKED = {"name": "Sim", "memory_mib": 8192, "link_group": "nv", "link_tx_mib_per_s": 300, "link_rx_mib_per_s": 200}


def test_a_real_prometheus_scrapes_models_gpus_links_and_the_front_door(
    write_config: ConfigWriter,
    start_daemon: Callable[[Path], Daemon],
    prometheus_for: Callable[[int], Prometheus],
) -> None:
    sim = [{**LINKED, "pcie_tx_mib_per_s": 40, "pcie_rx_mib_per_s": 10}, LINKED]
    config = write_config(
        {"a": {"autostart": True}, "b": {"autostart": True}, "lazy": {"on_demand": True}},
        gpus={"backend": "sim", "poll_interval": 0.5, "sim": sim},
    )
    daemon = start_daemon(config)
    for name in ("a", "b"):
        daemon.wait_for(name, lambda s: s["state"] == "ready")
    chat = {"model": "a", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    for _ in range(3):
        assert daemon.http.post("/v1/chat/completions", json=chat).status_code == 200
    prometheus = prometheus_for(int(daemon.url.rsplit(":", 1)[1]))

    # the servers' own series, per model, and the front door's
    poll_until(
        lambda: prometheus.label_values("launcher_server_requests_processing", "model"),
        lambda models: models == {"a", "b"},
        "llama-server series per model",
        60,
    )
    assert prometheus.label_values("launcher_server_tokens_predicted_total", "instance") == {"a", "b"}
    assert prometheus.label_values('launcher_requests_total{code="200"}', "model") == {"a"}
    # the GPU links, with their link and peer
    links = prometheus.query("launcher_gpu_link_tx_bytes_per_second")
    assert {(s["metric"]["gpu"], s["metric"]["link"], s["metric"]["peer"]) for s in links} == {
        ("0", "0", "1"),
        ("1", "0", "0"),
    }
    assert {float(s["value"][1]) for s in links} == {300 * 2**20}
    pcie = prometheus.query("launcher_gpu_pcie_tx_bytes_per_second")
    assert {s["metric"]["gpu"]: float(s["value"][1]) for s in pcie} == {"0": 40 * 2**20, "1": 0.0}

    # every expression of the dashboard parses and, but for the series this daemon does not make, has data;
    # a rate needs two scrapes within its window
    poll_until(
        lambda: prometheus.query("count_over_time(up[1m])"), lambda r: float(r[0]["value"][1]) >= 3, "scrapes", 30
    )
    for expr in dashboard_expressions():
        result = prometheus.query(expr.replace("$__rate_interval", "1m"))  # parses: query() checks the status
        if not any(name in expr for name in NOT_MADE_HERE):
            assert result, f"no data for the dashboard's {expr}"
    groups = prometheus.http.get("/api/v1/rules").json()["data"]["groups"]
    loaded = {rule["name"]: rule["health"] for group in groups for rule in group["rules"]}
    assert len(loaded) == 9 and set(loaded.values()) == {"ok"}, loaded  # the real Prometheus runs every rule
    assert prometheus.query('ALERTS{alertstate="firing"}') == []  # and none fires on a healthy daemon

    # a stopped model drops out; many scrapes never woke the on-demand one
    assert daemon.cli("down", "b").returncode == 0
    poll_until(
        lambda: prometheus.label_values("launcher_server_requests_processing", "model"),
        lambda models: models == {"a"},
        "b's series gone",
        30,
    )
    stopped = 'launcher_instance_state{state="stopped"} == 1'
    poll_until(lambda: prometheus.label_values(stopped, "instance"), lambda i: i == {"lazy", "b"}, "b stopped", 30)
    assert daemon.instance("lazy")["state"] == "stopped"
