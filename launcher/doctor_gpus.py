"""`launcher doctor`'s checks of the GPUs: devices the driver has but the library does not see, PCIe links
below their width or generation, NVLink lanes down, GPUs joined only through the CPU (and a tensor split
across them)."""

from __future__ import annotations

from collections.abc import Iterator

from launcher.config import Settings
from launcher.doctor_findings import Finding, Machine
from launcher.gpu.link_health import link_problems
from launcher.gpu.sysfs import amd_cards


def gpu_findings(machine: Machine) -> Iterator[Finding]:
    yield Finding("ok", "gpus", f"GPU backend {machine.backend}")
    if not machine.simulated:
        nvidia = len([p for p in machine.dev_root.glob("nvidia[0-9]*") if p.name[6:].isdigit()])
        amd = len(amd_cards(machine.drm_root))
        for vendor, present in (("nvidia", nvidia), ("amd", amd)):
            seen = len([g for g in machine.gpus if g.vendor == vendor])
            if present > seen:
                library = "NVML (nvidia-ml-py)" if vendor == "nvidia" else "amdsmi (or sysfs)"
                yield Finding(
                    "fail",
                    "gpus",
                    f"the driver has {present} {vendor} GPU device(s) but {library} sees {seen}",
                    "reboot after a driver update (library/driver version mismatch), check `nvidia-smi` or "
                    "`rocm-smi`; for AMD install the launcher's amd extra (amdsmi)",
                )
    for gpu in machine.gpus:
        label = f"GPU {gpu.index} ({gpu.name})"
        if gpu.error is not None:
            yield Finding("fail", "gpus", f"{label} cannot be read: {gpu.error}", "check the card and driver")
            continue
        yield Finding("ok", "gpus", f"{label}: {gpu.memory_used_mib} of {gpu.memory_total_mib} MiB used")
        slow = []
        if gpu.pcie_width is not None and gpu.pcie_width_max is not None and gpu.pcie_width < gpu.pcie_width_max:
            slow.append(f"x{gpu.pcie_width} of x{gpu.pcie_width_max}")
        if gpu.pcie_gen is not None and gpu.pcie_gen_max is not None and gpu.pcie_gen < gpu.pcie_gen_max:
            slow.append(f"gen {gpu.pcie_gen} of {gpu.pcie_gen_max}")
        if slow:
            yield Finding(
                "warn",
                "pcie",
                f"{label} PCIe link runs at {' and '.join(slow)}",
                "idle cards lower their generation to save power: check again under load; a narrow width "
                "means a riser, a shared slot or a BIOS setting (reseat the card, check the slot's lanes)",
            )

        for problem in link_problems(gpu.links):
            yield Finding(
                "warn",
                "links",
                f"{label}: {problem}",
                "reseat the NVLink bridge (or check the board's xGMI), then `nvidia-smi nvlink --status`; a "
                "tensor split over this link runs at the speed of what is left",
            )


def link_findings(machine: Machine) -> Iterator[Finding]:
    for (i, j), link in sorted(machine.links.items()):
        if not link.direct:
            yield Finding(
                "warn",
                "topology",
                f"GPUs {i} and {j} are joined only through the CPU ({link.value})",
                "a tensor split across them sends every token's activations through system memory: prefer "
                "one GPU per model, or GPUs on one switch or NVLink",
            )


def tensor_split_findings(settings: Settings, machine: Machine) -> Iterator[Finding]:
    """A model set to `split_mode: tensor` whose GPUs include a pair joined only through the CPU: every
    layer's partial results cross system memory (`auto` would take `layer` there)."""
    for name, model in settings.models.items():
        if model.split_mode != "tensor":
            continue
        usable = {g.index for g in machine.gpus if model.gpus == "auto" or g.index in model.gpus}
        slow = [pair for pair, link in sorted(machine.links.items()) if set(pair) <= usable and not link.direct]
        if slow:
            i, j = slow[0]
            yield Finding(
                "warn",
                "split",
                f"{name} has split_mode: tensor but GPUs {i} and {j} are joined only through the CPU",
                "split_mode: auto (a layer split there) or `gpus:` on NVLink-linked GPUs",
            )
