"""kubernetes/: each overlay renders with `kubectl kustomize`, kubernetes-validate --strict accepts every
rendered object it has a schema for, and the ServiceMonitor (a CRD it has no schema for) is checked here
(the PrometheusRule in test_monitoring.py). Beyond the schemas: the pieces agree with each other and
with the launcher's config (ports, paths, the token, the stop timeouts, the image's user).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.config import Settings
from launcher.config_file import load_settings
from launcher.daemon import longest_stop_s

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "kubernetes"
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
OVERLAYS = {"nvidia": "nvidia.com/gpu", "amd": "amd.com/gpu"}
NODE_LABELS = {"nvidia": "nvidia.com/gpu.present", "amd": "feature.node.kubernetes.io/amd-gpu"}
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
Doc = dict[str, Any]


@pytest.fixture(scope="module")
def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize` renders the overlays")
    return found


@pytest.fixture(scope="module")
def validator() -> Path:
    if not VALIDATE.is_file():
        pytest.skip(f"kubernetes-validate is not installed next to {sys.executable} (the dev extra)")
    return VALIDATE


def render(kubectl: str, directory: Path) -> list[Doc]:
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def with_pvc(tmp_path: Path, overlay: str) -> Path:
    """An overlay with the models-pvc component added, as a user would write it (kustomize takes relative
    paths only)."""
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(KUBE / "overlays" / overlay, tmp_path)],
        "components": [os.path.relpath(KUBE / "components" / "models-pvc", tmp_path)],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return tmp_path


@pytest.fixture(scope="module", params=["nvidia", "amd", "nvidia+pvc"])
def rendered(
    request: pytest.FixtureRequest, kubectl: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, list[Doc]]:
    name: str = request.param
    overlay = name.split("+")[0]
    if name.endswith("+pvc"):
        directory = with_pvc(tmp_path_factory.mktemp("with-pvc"), overlay)
    else:
        directory = KUBE / "overlays" / overlay
    return overlay, render(kubectl, directory)


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def validate(validator: Path, docs: list[Doc], where: Path) -> subprocess.CompletedProcess[str]:
    path = where / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return subprocess.run([str(validator), "--strict", str(path)], capture_output=True, text=True, timeout=120)


def test_strict_validation_accepts_every_builtin_object(
    rendered: tuple[str, list[Doc]], validator: Path, tmp_path: Path
) -> None:
    _, docs = rendered
    builtin = [d for d in docs if (d["apiVersion"], d["kind"]) not in CRDS]
    result = validate(validator, builtin, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # An object without a schema is only a warning to kubernetes-validate: none may slip through that way.
    assert "Couldn't find schema" not in output, output
    assert output.count("passed for resource") == len(builtin), output
    assert {"ConfigMap", "Service", "DaemonSet"} <= {d["kind"] for d in builtin}


def test_strict_validation_refuses_a_misspelt_field(kubectl: str, validator: Path, tmp_path: Path) -> None:
    """The verdict above means something: strict mode refuses a field the API does not have."""
    docs = render(kubectl, KUBE / "overlays" / "nvidia")
    daemonset = one(docs, "DaemonSet")
    daemonset["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"tcpSocket": {"port": 8400}}
    result = validate(validator, [daemonset], tmp_path)
    assert result.returncode != 0, result.stdout


def container(docs: list[Doc]) -> Doc:
    containers = one(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def mount_path(docs: list[Doc], volume: str) -> Path:
    found = [m["mountPath"] for m in container(docs)["volumeMounts"] if m["name"] == volume]
    assert len(found) == 1, volume
    return Path(found[0])


def volume(docs: list[Doc], name: str) -> Doc:
    volumes = one(docs, "DaemonSet")["spec"]["template"]["spec"]["volumes"]
    return dict(next(v for v in volumes if v["name"] == name))


def settings(docs: list[Doc], tmp_path: Path) -> Settings:
    """The launcher's config, as the pod sees it, loaded by the launcher itself."""
    config_map = one(docs, "ConfigMap", volume(docs, "config")["configMap"]["name"])
    env = {e["name"]: e["value"] for e in container(docs)["env"]}
    in_pod = Path(env["LAUNCHER_CONFIG"])
    assert in_pod.parent == mount_path(docs, "config")
    path = tmp_path / in_pod.name
    path.write_text(config_map["data"][in_pod.name])
    return load_settings(path)


def port_number(docs: list[Doc], name: str) -> int:
    return int(next(p["containerPort"] for p in container(docs)["ports"] if p["name"] == name))


def test_daemonset_runs_on_gpu_nodes_with_their_gpus(rendered: tuple[str, list[Doc]]) -> None:
    overlay, docs = rendered
    spec = one(docs, "DaemonSet")["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {NODE_LABELS[overlay]: "true"}
    assert {"key": OVERLAYS[overlay], "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    limits = container(docs)["resources"]["limits"]
    assert set(limits) == {OVERLAYS[overlay]} and int(limits[OVERLAYS[overlay]]) >= 1


def test_image_is_the_overlays_docker_variant(rendered: tuple[str, list[Doc]]) -> None:
    overlay, docs = rendered
    image = container(docs)["image"]
    assert image.rsplit(":", 1)[1] == {"nvidia": "cuda", "amd": "rocm"}[overlay]
    assert "/" in image, "the image must come from a registry the nodes can pull from"


def test_amd_pods_get_the_device_groups_by_number(rendered: tuple[str, list[Doc]]) -> None:
    overlay, docs = rendered
    groups = one(docs, "DaemonSet")["spec"]["template"]["spec"]["securityContext"].get("supplementalGroups", [])
    if overlay == "amd":
        assert len(groups) == 2 and all(isinstance(g, int) for g in groups)
    else:
        assert groups == []


def test_runs_as_the_images_non_root_user(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    pod = one(docs, "DaemonSet")["spec"]["template"]["spec"]["securityContext"]
    dockerfile_user = next(
        line.split()[1]
        for line in (ROOT / "docker" / "Dockerfile").read_text().splitlines()
        if line.startswith("USER ")
    )
    assert pod["runAsNonRoot"] is True
    assert f"{pod['runAsUser']}:{pod['runAsGroup']}" == dockerfile_user


def test_config_token_and_ports_agree(rendered: tuple[str, list[Doc]], tmp_path: Path) -> None:
    _, docs = rendered
    config = settings(docs, tmp_path)
    assert config.daemon.host == "0.0.0.0" and config.gpus.backend == "auto"
    token = config.daemon.token_file
    assert token is not None and token.parent == mount_path(docs, "token")
    secret = volume(docs, "token")["secret"]
    assert port_number(docs, "api") == config.daemon.port
    assert {m.port for m in config.models.values()} == {port_number(docs, "model")}
    assert str(config.daemon.state_dir) in {m["mountPath"] for m in container(docs)["volumeMounts"]}
    for model in config.models.values():
        assert isinstance(model.model, Path) and model.model.parent == mount_path(docs, "models")
    # The ServiceMonitor sends the same token the daemon reads.
    endpoint = one(docs, "ServiceMonitor")["spec"]["endpoints"][0]
    assert endpoint["authorization"]["credentials"] == {"name": secret["secretName"], "key": token.name}


def test_token_secret_is_readable_by_the_pods_group_only(rendered: tuple[str, list[Doc]]) -> None:
    """The kubelet mounts a Secret's files as root's, group the pod's fsGroup: the launcher (uid 10001)
    reads the token through the group, and refuses it if others can read it too (as ssh would)."""
    _, docs = rendered
    pod = one(docs, "DaemonSet")["spec"]["template"]["spec"]["securityContext"]
    mode = volume(docs, "token")["secret"]["defaultMode"]
    assert pod["fsGroup"] == pod["runAsGroup"] != 0
    assert mode & 0o040, f"{mode:04o}: the pod's user reads the root-owned token through its group"
    assert not mode & 0o007, f"{mode:04o}: the launcher refuses a token file others can read"


def test_models_come_from_the_host_or_the_claim(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    models = volume(docs, "models")
    claims = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    if claims:
        assert "hostPath" not in models
        assert models["persistentVolumeClaim"]["claimName"] == claims[0]["metadata"]["name"]
        assert set(claims[0]["spec"]["accessModes"]) <= {"ReadOnlyMany", "ReadWriteMany"}
    else:
        assert models["hostPath"]["type"] == "Directory"


def test_probes_readiness_follows_models_liveness_does_not(rendered: tuple[str, list[Doc]], tmp_path: Path) -> None:
    _, docs = rendered
    spec = container(docs)
    readiness = spec["readinessProbe"]["httpGet"]
    assert readiness["path"] == "/health"
    assert port_number(docs, readiness["port"]) == settings(docs, tmp_path).daemon.port
    # Liveness must not be /health (503 while a model loads or has failed): it asks only whether the daemon
    # answers, through the probe the image holds.
    liveness = spec["livenessProbe"]
    assert "httpGet" not in liveness
    assert Path(liveness["exec"]["command"][1]).name == "healthcheck.py" and "--alive" in liveness["exec"]["command"]
    assert "startupProbe" not in spec


def test_grace_period_outlasts_the_servers_stop(rendered: tuple[str, list[Doc]], tmp_path: Path) -> None:
    _, docs = rendered
    grace = one(docs, "DaemonSet")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= longest_stop_s(settings(docs, tmp_path).models.values()) + 10  # and a margin


def test_servicemonitor_scrapes_every_launcher(rendered: tuple[str, list[Doc]]) -> None:
    """kubernetes-validate has no schema for this CRD: its shape is checked here."""
    _, docs = rendered
    monitor = one(docs, "ServiceMonitor")
    assert (monitor["apiVersion"], monitor["kind"]) in CRDS
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert monitor["metadata"]["namespace"] == one(docs, "DaemonSet")["metadata"]["namespace"]
    selected = [
        s
        for s in docs
        if s["kind"] == "Service"
        and all(
            s["metadata"].get("labels", {}).get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items()
        )
    ]
    assert [s["metadata"]["name"] for s in selected] == ["launcher"]
    service = selected[0]
    # Every pod, ready or not: a node whose model is loading or has failed is the one to watch.
    assert service["spec"]["publishNotReadyAddresses"] is True
    pod_labels = one(docs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
        assert endpoint["authorization"]["type"] == "Bearer"
        assert json.dumps(endpoint).count("bearerToken") == 0  # the deprecated fields are not used as well


def test_model_service_routes_to_ready_pods_only(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    service = one(docs, "Service", "launcher-models")
    assert not service["spec"].get("publishNotReadyAddresses", False)
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["model"]
