"""GPUs: the backend seam (base.py), its implementations (nvml, amd, sysfs, sim), snapshot types and the
sampler. `open_backend` picks the backend the configuration asks for, or the first that works."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from launcher.config_gpus import GpuSettings
from launcher.errors import StartError
from launcher.gpu.base import GpuBackend, NoGpus
from launcher.gpu.types import GpuIdentity, HeldMib, nothing_held


def _nvml() -> GpuBackend:
    from launcher.gpu.nvml import NvmlBackend

    return NvmlBackend()


def _amdsmi() -> GpuBackend:
    from launcher.gpu.amd import AmdSmiBackend

    return AmdSmiBackend()


def _sysfs() -> GpuBackend:
    from launcher.gpu.sysfs import SysfsBackend

    return SysfsBackend()


_REAL: dict[str, Callable[[], GpuBackend]] = {"nvml": _nvml, "amdsmi": _amdsmi, "sysfs": _sysfs}


def open_backend(settings: GpuSettings, sim_usage: HeldMib = nothing_held) -> tuple[GpuBackend, str]:
    """The backend, and a sentence that says which one and why. ``sim_usage``: MiB per GPU index that the
    launcher's servers hold, which simulated GPUs show as used."""
    if settings.backend == "sim":
        from launcher.gpu.sim import SimBackend

        described = f"sim: {len(settings.sim)} simulated GPUs from the configuration"
        return SimBackend(settings.sim, usage=sim_usage), described
    if settings.backend == "none":
        return NoGpus(), "none: configured; servers run on the CPU"
    if settings.backend != "auto":
        try:
            backend = _REAL[settings.backend]()
        except Exception as exc:  # the libraries raise anything (amdsmi: KeyError)
            raise StartError(
                f"the {settings.backend} GPU backend cannot open: {_reason(exc)}",
                hint="check the driver (`launcher doctor`), or set gpus.backend: auto",
            ) from None
        return backend, f"{settings.backend}: configured, {len(backend.identities())} GPUs"
    tried = []
    for name, opener in _REAL.items():
        try:
            backend = opener()
        except Exception as exc:  # the libraries raise anything
            tried.append(f"{name}: {_reason(exc)}")
            continue
        if backend.identities():
            return backend, f"{name}: picked by auto, {len(backend.identities())} GPUs"
        backend.close()
        tried.append(f"{name}: no GPU")
    return NoGpus(), "none: auto found no GPU (" + "; ".join(tried) + "); servers run on the CPU"


def _reason(exc: Exception) -> str:
    if isinstance(exc, ImportError):
        return f"module {exc.name} is not installed"
    if isinstance(exc, KeyError):  # amdsmi without ROCm's libamd_smi.so
        return f"library {exc.args[0] if exc.args else ''} not found"
    return str(exc) or type(exc).__name__


def visibility_env(gpus: Sequence[GpuIdentity]) -> dict[str, str]:
    """The environment that shows a child exactly ``gpus``, in this order, named by UUID.

    CUDA numbers GPUs fastest-first unless told PCI_BUS_ID; NVML numbers them by bus. UUIDs plus
    PCI_BUS_ID order make a plan land on the cards it was made for. For AMD, ROCR_VISIBLE_DEVICES takes
    the UUIDs and HIP_VISIBLE_DEVICES is reset to all of those, so an inherited value cannot hide one.
    """
    if not gpus:
        return {}
    uuids = ",".join(g.uuid for g in gpus)
    if all(g.vendor == "amd" for g in gpus):
        return {"ROCR_VISIBLE_DEVICES": uuids, "HIP_VISIBLE_DEVICES": ",".join(str(i) for i in range(len(gpus)))}
    return {"CUDA_VISIBLE_DEVICES": uuids, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
