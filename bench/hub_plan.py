"""Planning a hub model before download: a 70B-shaped split model (Q8_0, three files, a 128k vocabulary, its
data a sparse hole) served by the stand-in hub on loopback (tests/hubstandin.py), planned through the real
`huggingface_hub` client. Figures: the bytes fetched (against the model's size and its headers' size), the
time to plan it from the hub with an empty header cache and from the cache, each against the baseline of
planning the same files from the local disk in the same run (medians).

Usage: .venv/bin/python -m bench.hub_plan [--runs N]   (from the repository root: it imports tests/)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from launcher.config_gpus import GpuSettings, SimGpu
from launcher.config_model import ModelSettings
from launcher.gpu.sampler import read_sample
from launcher.gpu.sim import SimBackend
from launcher.hub.headers import HubReader
from launcher.hub.planning import plan_from_hub
from launcher.hub_ref import parse_hub_ref
from launcher.plan.planner import Planner
from launcher.tinymodel import TinyShape, write_tiny_llama
from tests.hubstandin import Repo, serving

SHAPE_70B = TinyShape(
    n_layer=80, n_embd=8192, n_ff=28672, n_head=64, n_head_kv=8, extra_tokens=128_000, weight_type="q8_0"
)


def median_s(runs: int, work: Callable[[int], object]) -> float:
    times = []
    for run in range(runs):
        began = time.perf_counter()
        work(run)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    runs = parser.parse_args().runs
    root = Path(tempfile.mkdtemp(prefix="hub-plan-"))
    first = write_tiny_llama(root / "model" / "Llama-70B-Q8_0.gguf", SHAPE_70B, header_only=True, shards=3)
    files = {p.name: p for p in sorted(first.parent.iterdir())}
    size = sum(p.stat().st_size for p in files.values())
    headers = sum(p.stat().st_blocks * 512 for p in files.values())  # the data is a hole: the blocks are headers

    gpus = GpuSettings(backend="sim", sim=[SimGpu(name=f"Sim {n}", memory_mib=49152) for n in "AB"])
    backend = SimBackend(gpus.sim)
    samples = [read_sample(backend, g, processes=False) for g in backend.identities()]
    planner = Planner(gpus, backend.identities(), backend.links())
    local = ModelSettings(model=first, ctx=4096)
    hub_model = ModelSettings(model=parse_hub_ref("hf:org/Llama-70B-GGUF:Q8_0"), ctx=4096)

    # The baseline: the same files read from disk (a new path each run: the planner caches by file).
    copies = []
    for run in range(runs):
        (root / f"local{run}").mkdir()
        for name, path in files.items():
            (root / f"local{run}" / name).hardlink_to(path)
        copies.append(root / f"local{run}" / first.name)
    from_disk = median_s(runs, lambda run: planner.plan("m", local, copies[run], samples, {}))

    with serving({"org/Llama-70B-GGUF": Repo(files)}) as hub:
        cold = median_s(
            runs,
            lambda run: plan_from_hub(
                planner, HubReader(root / f"cache{run}", None, 64 << 20, endpoint=hub.url), "m", hub_model, samples, {}
            ),
        )
        fetched = hub.total_sent // runs
        warm = median_s(
            runs,
            lambda run: plan_from_hub(
                planner, HubReader(root / "cache0", None, 64 << 20, endpoint=hub.url), "m", hub_model, samples, {}
            ),
        )
    print(f"model: {size} bytes ({size / 2**30:.1f} GiB) in {len(files)} files; headers about {headers} bytes on disk")
    print(f"fetched to plan it: {fetched} bytes = {100 * fetched / size:.4f} % of the model")
    print(f"plan from the local files (baseline): median {from_disk * 1000:.0f} ms of {runs}")
    print(f"plan from the hub, empty cache: median {cold * 1000:.0f} ms ({cold / from_disk:.2f}x the baseline)")
    print(f"plan from the hub, header cache: median {warm * 1000:.0f} ms ({warm / from_disk:.2f}x the baseline)")


if __name__ == "__main__":
    main()
