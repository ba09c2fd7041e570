"""`launcher doctor`: each problem it knows, from simulated configurations and prepared machines."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from launcher.config_file import parse_settings
from launcher.doctor import examine
from launcher.doctor_findings import Finding, Machine
from launcher.gpu.types import Link
from launcher.schema_gpus import GpuSample
from tests.archmodels import write_gemma3, write_unknown_architecture
from tests.conftest import ConfigWriter, free_port, run_cli


def doctor(config: Path, env: dict[str, str]) -> tuple[int, list[dict[str, Any]]]:
    result = run_cli("--config", str(config), "doctor", "--json", env=env)
    assert "Traceback" not in result.stderr
    return result.returncode, json.loads(result.stdout)


def problems(findings: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(f["level"], f["check"], f["message"]) for f in findings if f["level"] != "ok"]


SIM = {"name": "Sim", "memory_mib": 24576}


def test_a_healthy_sim_setup_has_no_failures(write_config: ConfigWriter, marked_env: dict[str, str]) -> None:
    gpus = {"backend": "sim", "sim": [{**SIM, "link_group": "a"}, {**SIM, "link_group": "a"}]}
    code, findings = doctor(write_config(gpus=gpus), marked_env)
    assert code == 0
    assert [p for p in problems(findings) if p[1] != "ollama"] == []
    assert any(f["check"] == "llama-server" and "CPU build" in f["message"] for f in findings)


def test_slow_pcie_and_cpu_only_links(write_config: ConfigWriter, marked_env: dict[str, str]) -> None:
    narrow = {**SIM, "pcie_width": 4, "pcie_gen": 3}
    code, findings = doctor(write_config(gpus={"backend": "sim", "sim": [narrow, SIM]}), marked_env)
    found = problems(findings)
    assert ("warn", "pcie", "GPU 0 (Sim) PCIe link runs at x4 of x16 and gen 3 of 4") in found
    assert ("warn", "topology", "GPUs 0 and 1 are joined only through the CPU (cpu)") in found
    assert code == 0  # warnings only


def test_too_few_gpu_layers_and_bad_splits(write_config: ConfigWriter, marked_env: dict[str, str]) -> None:
    gpus = {"backend": "sim", "sim": [SIM, SIM]}
    models = {
        "few": {"args": ["-ngl", "2"]},
        "wide": {"tensor_split": [1, 1, 1]},
        "wide-args": {"args": ["--tensor-split", "1/1/0"]},  # an all-zero split is a config error (test_config)
        "fine": {"args": ["--n-gpu-layers=99", "-ts", "3,1"]},
    }
    code, findings = doctor(write_config(models, gpus=gpus), marked_env)
    found = problems(findings)
    assert code == 1
    assert (
        "warn",
        "layers",
        "models.few.args: -ngl 2 puts 2 of 4 layers (+ output) on the GPUs; the rest run on the CPU, many times slower",
    ) in found
    assert ("fail", "split", "models.wide: the tensor split has 3 entries for 2 GPU(s)") in found
    assert ("fail", "split", "models.wide-args: the tensor split has 3 entries for 2 GPU(s)") in found
    assert not [p for p in found if "models.fine" in p[2]]


def test_ports_in_use_missing_files_and_ollama(
    write_config: ConfigWriter, marked_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    models = {"tiny": {"port": port}, "gone": {"model": str(tmp_path / "gone.gguf")}, "oll": {"backend": "ollama"}}
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        code, findings = doctor(write_config(models), marked_env | {"PATH": "/usr/bin:/bin"})
    found = problems(findings)
    assert code == 1
    assert any(p[1] == "ports" and p[2].startswith(f"port {port} for models.tiny.port is in use by ") for p in found)
    assert ("fail", "models", f"models.gone.model {tmp_path / 'gone.gguf'} does not exist") in found
    assert ("fail", "ollama", "no ollama binary on PATH (needed by oll)") in found


def test_config_errors_are_reported_and_the_machine_still_checked(tmp_path: Path, marked_env: dict[str, str]) -> None:
    config = tmp_path / "launcher.yaml"
    config.write_text("models: {m: {model: a.gguf, port: -1}}\n")
    code, findings = doctor(config, marked_env)
    assert code == 1
    assert findings[0]["level"] == "fail" and "models.m.port" in findings[0]["message"]
    assert any(f["check"] == "gpus" for f in findings)


def sample(index: int, vendor: str = "nvidia", **values: Any) -> GpuSample:
    return GpuSample(
        index=index, uuid=f"GPU-{index}", name="RTX 3090", pci_bus_id=None, vendor=vendor, time=0, **values
    )


def machine_findings(tmp_path: Path, machine: Machine) -> list[Finding]:
    return examine(parse_settings("", tmp_path / "l.yaml"), machine, set())


def test_driver_devices_the_library_does_not_see(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (dev / name).touch()
    machine = Machine(
        gpus=[sample(0)], links={}, backend="nvml", simulated=False, dev_root=dev, drm_root=tmp_path / "drm"
    )
    found = [f for f in machine_findings(tmp_path, machine) if f.level == "fail"]
    assert found[0].message == "the driver has 2 nvidia GPU device(s) but NVML (nvidia-ml-py) sees 1"


def test_llama_server_without_gpu_support_on_a_gpu_machine(tmp_path: Path) -> None:
    machine = Machine(
        gpus=[sample(0, memory_total_mib=24576, memory_used_mib=0)],
        links={},
        backend="nvml",
        simulated=False,
        dev_root=tmp_path,
        drm_root=tmp_path,
    )
    [finding] = [f for f in machine_findings(tmp_path, machine) if f.check == "llama-server"]
    assert finding.level == "fail"
    assert finding.message.endswith("(default)) was built without GPU support: it lists no GPU device")
    assert finding.fix is not None and "-DGGML_CUDA=ON" in finding.fix


def test_a_gpu_that_cannot_be_read_and_cross_cpu_links(tmp_path: Path) -> None:
    machine = Machine(
        gpus=[sample(0, error="GpuError: GPU is lost"), sample(1)],
        links={(0, 1): Link.CROSS_CPU},
        backend="nvml",
        simulated=True,
    )
    found = [(f.level, f.message) for f in machine_findings(tmp_path, machine)]
    assert ("fail", "GPU 0 (RTX 3090) cannot be read: GpuError: GPU is lost") in found
    assert ("warn", "GPUs 0 and 1 are joined only through the CPU (cross-cpu)") in found


def test_an_architecture_without_a_rule_is_a_warning(tmp_path: Path) -> None:
    new, known = write_unknown_architecture(tmp_path / "new.gguf"), write_gemma3(tmp_path / "known.gguf")
    config = f"models: {{new: {{model: {new}}}, known: {{model: {known}}}}}\n"
    machine = Machine(gpus=[], links={}, backend="none", simulated=True)
    found = [
        f for f in examine(parse_settings(config, tmp_path / "l.yaml"), machine, set()) if f.check == "architecture"
    ]
    assert found == [
        Finding(
            "warn",
            "architecture",
            "models.new: the planner has no rule for architecture 'futur3'; it plans it as a plain transformer "
            "(full attention and a KV cache on every layer)",
            "check `launcher plan` against llama-server's `-lv 4` buffer sizes before relying on it",
        )
    ]


def test_a_tensor_split_over_gpus_joined_through_the_cpu(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    text = f"models:\n  a: {{model: {model}, split_mode: tensor}}\n  b: {{model: {model}, split_mode: auto}}\n"
    settings = parse_settings(text, tmp_path / "l.yaml")
    links = {(0, 1): Link.CPU}
    machine = Machine(gpus=[sample(0), sample(1)], links=links, backend="nvml", simulated=True)
    found = [f.message for f in examine(settings, machine, set()) if f.check == "split"]
    assert found == ["a has split_mode: tensor but GPUs 0 and 1 are joined only through the CPU"]
    linked = Machine(gpus=[sample(0), sample(1)], links={(0, 1): Link.NVLINK}, backend="nvml", simulated=True)
    assert not [f for f in examine(settings, linked, set()) if f.check == "split"]
