"""`launcher doctor`'s checks of each model: its file (there, a whole GGUF the planner can read, an
architecture it has a rule for), its projector, its tensor split and -ngl."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from launcher.backends.ollama import OllamaBackend
from launcher.config_model import ModelSettings
from launcher.doctor_findings import Finding
from launcher.errors import LauncherError
from launcher.hub_ref import HubRef
from launcher.plan.arch import rule_of
from launcher.plan.estimate import ModelShape
from launcher.plan.gguf import GgufFile, ModelFileError, read_gguf, regular_problem
from launcher.schema_gpus import GpuSample
from launcher.server_args import GPU_LAYERS, MMPROJ, TENSOR_SPLIT, arg_value, tensor_split


def model_findings(name: str, model: ModelSettings, gpus: list[GpuSample]) -> Iterator[Finding]:
    where = f"models.{name}"
    if model.backend == "rpc-server":  # no model of its own: its binary and address are checked apart
        return
    if model.backend == "ollama":
        backend = OllamaBackend(model)
        try:
            backend.check_model(model, name)
        except LauncherError as exc:
            yield Finding("fail", "models", exc.message, exc.hint)
        blob = backend.model_file(model)
        if blob is not None:
            yield from _read_header(where, blob, "model file")[1]
        return
    if isinstance(model.model, HubRef):  # nothing local to read until it is downloaded
        yield Finding("ok", "models", f"{where}.model: {model.model} on the hub; `launcher plan {name}` plans it")
        return
    problem = "does not exist" if model.model is None else regular_problem(model.model)
    if model.model is None or problem is not None:
        yield Finding("fail", "models", f"{where}.model {model.model} {problem}", "fix the path")
        return
    # The configuration checked -ts and -ngl when it was loaded: their values parse, and a split has a
    # positive proportion (as tensor_split must).
    split_arg = arg_value(model.args, *TENSOR_SPLIT)
    split = tensor_split(split_arg) if split_arg is not None else model.tensor_split
    count = len(model.gpus) if isinstance(model.gpus, list) else len(gpus)
    if isinstance(split, list) and len(split) > count:
        yield Finding(
            "fail",
            "split",
            f"{where}: the tensor split has {len(split)} entries for {count} GPU(s)",
            "one proportion per GPU; they need not sum to 1 (llama.cpp normalises them)",
        )
    projector = arg_value(model.args, *MMPROJ)
    if projector is not None:
        yield from _read_header(where, Path(projector), "the --mmproj file")[1]
    found, problems = _read_header(where, model.model, "model file")
    yield from problems
    if found is None:
        return
    architecture, layers = found.architecture, int(found.arch("block_count"))
    if architecture and rule_of(architecture) is None:
        yield Finding(
            "warn",
            "architecture",
            f"{where}: the planner has no rule for architecture {architecture!r}; it plans it as a plain "
            "transformer (full attention and a KV cache on every layer)",
            "check `launcher plan` against llama-server's `-lv 4` buffer sizes before relying on it",
        )
    layers_arg = arg_value(model.args, *GPU_LAYERS)
    if layers_arg is not None and layers_arg not in ("auto", "all") and gpus:
        asked = int(layers_arg)
        if asked < layers + 1:
            yield Finding(
                "warn",
                "layers",
                f"{where}.args: -ngl {asked} puts {min(asked, layers)} of {layers} layers (+ output) on the GPUs; "
                "the rest run on the CPU, many times slower",
                "drop -ngl from args: the launcher offloads every layer that fits and says when they do not",
            )


def _read_header(where: str, path: Path, what: str) -> tuple[GgufFile | None, list[Finding]]:
    """The header of ``path`` as the planner reads it (None when it cannot: a FIFO, a bad or cut header,
    a value out of bounds), and what is wrong with the file: that, or tensor data that is not all there
    (a file cut short: an unfinished download)."""
    try:
        found = read_gguf(path, what)
        if what == "model file":
            ModelShape.of(found)
    except ModelFileError as exc:
        return None, [Finding("fail", "models", f"{where}: {exc.message}", exc.hint or "fix or replace the file")]
    if found.data_end > found.file_bytes:
        cut = Finding(
            "fail",
            "models",
            f"{where}: {what} {path} is cut short: its tensor data ends at byte {found.data_end} but the file "
            f"has {found.file_bytes} bytes",
            "an unfinished download or copy: fetch or copy it again",
        )
        return found, [cut]
    return found, []
