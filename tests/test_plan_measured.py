"""Correction from measurement (issue 23 point 3) without a server: a check of a plan on a GPU read
through the NVML fake (the server's buffers from load-log lines in llama.cpp's shape, the process's memory
from the fake's process list) is kept in the state directory; the next plan of the same key takes the
measured terms within 1 MiB and the driver's share learned for that GPU name and driver version; another
key, another layout or `--estimate` keep the estimate; a hostile file is no measurement."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import cast

import pytest
from pydantic import ValidationError

from launcher.backends import llama_log
from launcher.config_gpus import GpuSettings
from launcher.config_model import ModelSettings
from launcher.gpu.nvml import NvmlBackend
from launcher.gpu.sampler import read_sample
from launcher.plan.measured import MeasuredDevice, MeasuredTerms, Measurement, with_measured, with_process_mib
from launcher.plan.planner import Measured, Planner
from launcher.schema_gpus import GpuSample
from launcher.schema_plans import Plan
from launcher.statedir.measurements import MeasurementStore
from launcher.supervise.measuring import Measuring, measurement_key
from launcher.tinymodel import TinyShape, write_tiny_llama
from tests.fakes import GIB, FakeGpu, FakeNvml

MIB = 1024 * 1024
SERVER_PID = 4242


@pytest.fixture
def nvml() -> NvmlBackend:
    # the server's process holds 700 MiB on GPU 0: its buffers (below) and the driver's share
    gpu = FakeGpu(name="NVIDIA H200", total_bytes=140 * GIB, used_bytes=1 * GIB, processes=[(SERVER_PID, 700 * MIB)])
    return NvmlBackend(FakeNvml([gpu]))


def _samples(nvml: NvmlBackend) -> list[GpuSample]:
    return [read_sample(nvml, g, processes=True) for g in nvml.identities()]


def _log(plan: Plan, weights: float, kv: float, compute: float) -> str:
    """The load-log lines llama-server prints for ``plan``'s one GPU (and a little on the host)."""
    assert [d.gpu for d in plan.devices] == [0]
    return "\n".join(
        [
            f"0.00.038.843 I load_tensors:        CUDA0 model buffer size = {weights:10.2f} MiB",
            "0.00.038.843 I load_tensors:   CPU_Mapped model buffer size =       0.35 MiB",
            "0.00.041.980 I llama_context:  CUDA_Host  output buffer size =       0.49 MiB",
            f"0.00.042.060 I llama_kv_cache:        CUDA0 KV buffer size = {kv:10.2f} MiB",
            f"0.00.049.398 I sched_reserve:        CUDA0 compute buffer size = {compute:10.2f} MiB",
            "0.00.049.398 I sched_reserve:    CUDA_Host compute buffer size =       4.01 MiB",
        ]
    )


def test_a_measured_gpu_run_plans_the_next_within_1_mib_and_teaches_the_drivers_share(
    nvml: NvmlBackend, tiny_model: Path, tmp_path: Path
) -> None:
    model = ModelSettings(model=tiny_model, ctx=2048)
    binary = tmp_path / "llama-server"
    binary.write_bytes(b"a build")
    planner = Planner(GpuSettings(), nvml.identities(), {})
    estimated = planner.plan("tiny", model, tiny_model, _samples(nvml), {})
    [gpu] = estimated.devices
    assert (estimated.measured, gpu.overhead_mib) == (None, GpuSettings().overhead_mib)

    check = llama_log.check(estimated, llama_log.parse(_log(estimated, 0.35, 40.0, 120.25)))
    # what the GPU reading says the server's process holds, beside its buffers
    readings = {s.index: s.processes for s in _samples(nvml)}
    assert with_process_mib(check, estimated, 1, readings).devices[0].process_mib is None  # another pid's only
    check = with_process_mib(check, estimated, SERVER_PID, readings)
    assert check.devices[0].process_mib == 700

    store = MeasurementStore(tmp_path / "state" / "measured.json")
    measuring = Measuring(store, nvml.identities())
    # a server whose log names no buffer on the planned GPU (it ran on the CPU): nothing kept
    on_cpu = llama_log.check(estimated, llama_log.parse(_log(estimated, 0.35, 40.0, 120.25).replace("CUDA0", "CPU")))
    assert measuring.record("tiny", model, tiny_model, binary, estimated, on_cpu) is None
    assert not store.path.exists()
    kept = measuring.record("tiny", model, tiny_model, binary, estimated, check)
    assert kept is not None and kept.devices[0].process_mib == 700
    # the driver's share: 700 - (0.35 + 40 + 120.25) = 539.4, rounded up; per GPU name and driver version
    assert store.overheads_mib() == {"NVIDIA H200|550.54.15": 540}
    assert measuring.overheads_mib() == {0: 540}

    found = measuring.lookup(model, tiny_model, binary)
    assert found == kept
    measured = planner.plan("tiny", model, tiny_model, _samples(nvml), {}, measured=Measured(found, {0: 540}))
    [gpu] = measured.devices
    assert measured.measured == kept.date and measured.fits
    assert (gpu.weights_mib, gpu.kv_cache_mib, gpu.compute_mib, gpu.overhead_mib) == (1, 40, 121, 540)
    assert (measured.host.weights_mib, measured.host.compute_mib, measured.host.output_mib) == (1, 5, 1)
    # every term within 1 MiB of what was measured: the next check finds the plan right
    again = llama_log.check(measured, llama_log.parse(_log(measured, 0.35, 40.0, 120.25)))
    for device in again.devices:
        for term in device.terms.values():
            assert 0 <= -term.difference_mib < 1

    # the estimate, whatever was measured (`launcher plan --estimate`): no argument given
    assert planner.plan("tiny", model, tiny_model, _samples(nvml), {}).measured is None


def test_anything_in_the_key_changed_is_another_key(tiny_model: Path, tmp_path: Path) -> None:
    binary = tmp_path / "llama-server"
    binary.write_bytes(b"a build")
    model = ModelSettings(model=tiny_model, ctx=2048, args=["-fa", "on"])
    key = measurement_key(model, tiny_model, binary)
    assert key == measurement_key(ModelSettings(model=tiny_model, ctx=2048, args=["-fa", "on"]), tiny_model, binary)
    others = [
        ModelSettings(model=tiny_model, ctx=4096, args=["-fa", "on"]),
        ModelSettings(model=tiny_model, ctx=2048, args=["-fa", "on", "-ub", "1024"]),
        ModelSettings(model=tiny_model, ctx=2048, args=["-fa", "on"], env={"LLAMA_ARG_UBATCH": "4096"}),
    ]
    assert all(measurement_key(other, tiny_model, binary) != key for other in others)
    binary.write_bytes(b"another build")  # a new server version
    assert measurement_key(model, tiny_model, binary) != key


def _measurement(plan: Plan, **changes: object) -> Measurement:
    devices = [
        {"remote": False, "gpu": d.gpu, "name": d.name, "layers": d.layers, "output_layer": d.output_layer,
         "terms": MeasuredTerms(weights=1, kv=2)} | changes
        for d in plan.devices
    ]  # fmt: skip
    return Measurement.model_validate(
        {"model": "tiny", "date": "2026-12-02", "ctx": plan.ctx, "devices": devices, "host": MeasuredTerms()}
    )


def test_another_layout_keeps_the_estimate_and_a_measured_plan_that_no_longer_fits_says_so(
    nvml: NvmlBackend, tiny_model: Path
) -> None:
    model = ModelSettings(model=tiny_model, ctx=2048)
    plan = Planner(GpuSettings(), nvml.identities(), {}).plan("tiny", model, tiny_model, _samples(nvml), {})
    assert with_measured(plan, _measurement(plan)).measured == "2026-12-02"
    assert with_measured(plan, _measurement(plan, layers=plan.devices[0].layers - 1)) == plan
    assert with_measured(plan, _measurement(plan, remote=True)) == plan
    other_context = _measurement(plan).model_copy(update={"ctx": 4096})  # `ctx: max` chose another
    assert with_measured(plan, other_context) == plan
    huge = _measurement(plan, terms=MeasuredTerms(weights=200 * 1024))  # 200 GiB of weights on a 140 GiB GPU
    refused = with_measured(plan, huge)
    assert not refused.fits and refused.reason is not None and "measured" in refused.reason
    assert "`launcher plan --forget" in refused.suggestions[-1]


@pytest.mark.parametrize(
    "content",
    [b"not json", b'{"measured": {"k": {"model": "x"}}}', b'{"measured": {}, "extra": 1}', b"[" * 100_000, b"\xff\xfe"],
)
def test_a_hostile_state_file_is_no_measurement_and_is_replaced_whole(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "measured.json"
    path.write_bytes(content)
    store = MeasurementStore(path)
    assert store.get("k") is None and store.overheads_mib() == {}
    kept = Measurement(model="tiny", date="2026-12-02", devices=[], host=MeasuredTerms(kv=1.5))
    store.put("k", kept)
    assert MeasurementStore(path).get("k") == kept


@pytest.mark.parametrize("field", ["model", "date"])
def test_a_state_file_with_a_huge_string_is_no_measurement_and_says_so_once(
    tmp_path: Path, field: str, caplog: pytest.LogCaptureFixture
) -> None:
    """8 MiB where the launcher writes a name or a date (before: loaded, then shown in plans and messages)."""
    path = tmp_path / "measured.json"
    kept = Measurement(model="tiny", date="2026-12-02T07:00:00+00:00", devices=[], host=MeasuredTerms())
    path.write_text(json.dumps({"measured": {"k": kept.model_dump() | {field: "x" * 8 * MIB}}}))
    store = MeasurementStore(path)
    with caplog.at_level(logging.WARNING, logger="launcher"):
        assert store.get("k") is None and store.get("k") is None  # read at each plan: said once
    assert [r.getMessage() for r in caplog.records] == [
        f"{path} is not what the launcher writes (measured.k.{field}: String should have at most 64 characters): "
        "ignored, plans are estimated until the next measurement replaces it"
    ]
    with pytest.raises(ValidationError):
        Measurement.model_validate(kept.model_dump() | {field: "x" * 65})
    store.put("k", kept)  # replaced whole at the next write
    assert store.get("k") == kept


@pytest.mark.parametrize(
    ("where", "value", "problem"),
    [
        ("name", "x" * 8 * MIB, "String should have at most 256 characters"),
        ("gpu", 10**30, "Input should be less than or equal to 256"),
        ("layers", -1, "Input should be greater than or equal to 0"),
        ("process_mib", 2**60, "Input should be less than or equal to 1099511627776"),
        ("devices", 300, "List should have at most 256 items after validation, not 300"),
    ],
)
def test_a_state_file_with_a_hostile_device_is_no_measurement(
    tmp_path: Path, where: str, value: object, problem: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A device's name, index, layers and process reading, and how many devices, are bounded as the model's
    name is: a file written by something else is ignored with one warning, not held and shown in plans."""
    device = MeasuredDevice(remote=False, gpu=0, name="GPU", layers=1, output_layer=True, terms=MeasuredTerms())
    kept = Measurement(model="tiny", date="d", devices=[device], host=MeasuredTerms())
    written = kept.model_dump()
    if where == "devices":
        written["devices"] = [device.model_dump()] * cast(int, value)
        at = "devices"
    else:
        written["devices"] = [device.model_dump() | {where: value}]
        at = f"devices.0.{where}"
    path = tmp_path / "measured.json"
    path.write_text(json.dumps({"measured": {"k": written}}))
    with caplog.at_level(logging.WARNING, logger="launcher"):
        assert MeasurementStore(path).get("k") is None
    [warning] = [r.getMessage() for r in caplog.records]
    assert f"(measured.k.{at}: {problem})" in warning


def test_forget_drops_one_models_measurements_and_the_store_is_bounded(tmp_path: Path) -> None:
    store = MeasurementStore(tmp_path / "measured.json")
    for i in range(260):
        store.put(f"k{i}", Measurement(model="a" if i % 2 else "b", date="d", devices=[], host=MeasuredTerms()))
    assert store.get("k0") is None and store.get("k4") is not None  # the oldest beyond 256 went
    assert store.forget("a") == 128 and store.forget("a") == 0
    assert store.get("k5") is None and store.get("k4") is not None
    # nothing to forget: nothing written, not even the state directory
    assert MeasurementStore(tmp_path / "none" / "measured.json").forget("a") == 0 and not (tmp_path / "none").exists()


def test_two_writers_at_once_lose_nothing_and_never_fail(tmp_path: Path) -> None:
    """The daemon files measurements while `launcher plan --forget` (another process) may change the file: each
    change is whole (before: both wrote measured.json.new, one rename failed, and one undid the other's)."""
    store = MeasurementStore(tmp_path / "measured.json")
    errors: list[BaseException] = []

    def put_many(model: str) -> None:
        try:
            for i in range(100):
                store.put(f"{model}{i}", Measurement(model=model, date="d", devices=[], host=MeasuredTerms()))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=put_many, args=(m,)) for m in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert all(store.get(f"{m}{i}") is not None for m in ("a", "b") for i in range(100))
    assert not list(tmp_path.glob("*.new"))


def test_a_state_file_that_cannot_be_read_leaves_plans_estimated(tmp_path: Path) -> None:
    (tmp_path / "measured.json").mkdir()  # not a file the launcher wrote: planning goes on from the estimate
    measuring = Measuring(MeasurementStore(tmp_path / "measured.json"), [])
    assert measuring.overheads_mib() == {}


def test_a_hub_projector_is_keyed_by_the_file_it_resolves_to_in_the_cache(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub projector is pulled at main: a new commit there is another file, measured anew (before, the
    key held its reference alone, so the old projector's measurement was applied to the new one)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    binary = tmp_path / "llama-server"
    binary.write_bytes(b"a build")
    repo = tmp_path / "hub" / "models--org--vision-GGUF"
    model = ModelSettings.model_validate(
        {"model": "hf:org/vision-GGUF:F16", "mmproj": "hf:org/vision-GGUF/mmproj-F16.gguf"}
    )
    keys = []
    for commit, size in (("a" * 40, 10), ("b" * 40, 20)):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "mmproj-F16.gguf").write_bytes(b"\0" * size)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        keys.append(measurement_key(model, tiny_model, binary))
    assert keys[0] != keys[1]
    assert keys[1] == measurement_key(model, tiny_model, binary)


def _over_estimate(plan: Plan, share: float) -> Measurement:
    """A run of ``plan`` whose server measured ``share`` more than the estimate of every GPU term."""
    [gpu] = plan.devices
    terms = MeasuredTerms(
        weights=gpu.weights_mib * (1 + share), kv=gpu.kv_cache_mib * (1 + share), compute=gpu.compute_mib * (1 + share)
    )
    device = {"remote": False, "gpu": 0, "name": gpu.name, "layers": gpu.layers, "output_layer": gpu.output_layer}
    return Measurement.model_validate(
        {"model": "m", "date": "2026-12-02", "ctx": plan.ctx, "devices": [device | {"terms": terms}], "host": {}}
    )


def test_ctx_max_after_a_run_above_the_estimate_chooses_a_smaller_context_not_a_refusal(tmp_path: Path) -> None:
    """`ctx: max` fills the GPU by the estimate; a server 2 % above it there (within the planner's targets)
    made the next plan at that context not fit, refused (before) instead of a context that fits."""
    shape = TinyShape(n_layer=8, n_embd=1024, n_head=8, n_head_kv=8, n_ff=2048, context_length=1 << 20)
    model_file = write_tiny_llama(tmp_path / "m.gguf", shape)
    nvml = NvmlBackend(FakeNvml([FakeGpu(name="NVIDIA H200", total_bytes=8 * GIB, used_bytes=0)]))
    planner = Planner(GpuSettings(), nvml.identities(), {})
    model = ModelSettings(model=model_file, ctx="max")
    first = planner.plan("m", model, model_file, _samples(nvml), {})
    assert first.fits and first.devices[0].free_after_mib < first.devices[0].kv_cache_mib // 16  # the GPU filled
    run = _over_estimate(first, 0.02)
    second = planner.plan("m", model, model_file, _samples(nvml), {}, measured=Measured(run))
    assert second.fits and second.ctx < first.ctx, second.reason
    excess = -(-sum(run.devices[0].terms.model_dump().values()) // 1) - (first.devices[0].total_mib - 512)
    assert second.devices[0].total_mib + excess <= first.devices[0].usable_mib  # room for what it measures
    assert any("held back" in warning for warning in second.warnings)
    # that smaller context measured in turn: planned again at it, from its measured terms, and it fits
    third = planner.plan("m", model, model_file, _samples(nvml), {}, measured=Measured(_over_estimate(second, 0.02)))
    assert third.fits and third.ctx <= second.ctx
