"""Reading llama-server options out of a model's pass-through `args`, as llama.cpp would, and checking, when
the configuration is loaded, the ones the planner and doctor read: a bad value is then a config error that
names the flag, not a traceback when a plan is made. Light on purpose: the configuration imports it."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterator, Sequence

# Bytes per element of the KV cache types llama.cpp offers (its kv_cache_types, for -ctk and -ctv).
CACHE_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
                    "q4_1": 20 / 32, "q4_0": 18 / 32, "iq4_nl": 18 / 32}  # fmt: skip

CTX = ("-c", "--ctx-size")
# llama.cpp pads every KV stream of a context to a multiple of this many cells (src/llama-context.cpp)
CTX_CELLS = 256
CACHE_TYPE_K = ("-ctk", "--cache-type-k")
CACHE_TYPE_V = ("-ctv", "--cache-type-v")
FLASH_ATTN = ("-fa", "--flash-attn")
UBATCH = ("-ub", "--ubatch-size")
BATCH = ("-b", "--batch-size")
PARALLEL = ("-np", "--parallel")
GPU_LAYERS = ("-ngl", "--n-gpu-layers", "--gpu-layers")
TENSOR_SPLIT = ("-ts", "--tensor-split")
N_CPU_MOE = ("-ncmoe", "--n-cpu-moe")
OVERRIDE_TENSOR = ("-ot", "--override-tensor")
MMPROJ = ("-mm", "--mmproj")

# llama.cpp's spellings of on, off and auto (common_arg_utils::is_truthy, is_falsey, is_autoy); None: auto.
_FLASH_ATTN = {"on": True, "enabled": True, "true": True, "1": True,
               "off": False, "disabled": False, "false": False, "0": False, "auto": None, "-1": None}  # fmt: skip
_WHOLE = re.compile(r"[0-9]+")
_NUMBER = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?")
_SPLIT_SEPARATORS = re.compile(r"[,/]+")  # as llama.cpp splits -ts


def _occurrences(args: Sequence[str], flags: Collection[str]) -> Iterator[tuple[str, str | None]]:
    """Each of ``flags`` in ``args`` as written, with its value (`--flag value` or `--flag=value`; None
    when the flag ends the list)."""
    for i, arg in enumerate(args):
        name, eq, inline = arg.partition("=")
        if name in flags:
            yield name, inline if eq else (args[i + 1] if i + 1 < len(args) else None)


def arg_value(args: Sequence[str], *flags: str) -> str | None:
    """The value of the last of ``flags`` in ``args`` (llama.cpp takes the last); `--flag=value` too."""
    values = [value for _, value in _occurrences(args, flags)]
    return values[-1] if values else None


def last_switch(args: Sequence[str], on: Collection[str], off: Collection[str]) -> bool | None:
    """Whether the last of the switches ``on`` and ``off`` in ``args`` is an ``on`` one; None when neither is."""
    found = None
    for arg in args:
        if arg in on or arg in off:
            found = arg in on
    return found


def every_value(args: Sequence[str], *flags: str) -> list[str]:
    """The values of every occurrence of ``flags`` (for options that add up, like -ot)."""
    return [value for _, value in _occurrences(args, flags) if value is not None]


def tensor_overrides(value: str) -> list[tuple[str, str]]:
    """-ot's `pattern=buffer type,...` pairs, in order."""
    return [tuple(pair.rsplit("=", 1)) for pair in value.split(",") if pair]  # type: ignore[misc]


def flash_attn(value: str) -> bool | None:
    """-fa's value: on, off, or None for auto."""
    return _FLASH_ATTN[value]


def tensor_split(value: str) -> list[float]:
    """-ts's proportions."""
    return [float(part) for part in _SPLIT_SEPARATORS.split(value)]


def _is_split(value: str) -> bool:
    parts = _SPLIT_SEPARATORS.split(value)
    return all(_NUMBER.fullmatch(p) for p in parts) and any(float(p) > 0 for p in parts)


# llama.cpp reads these numbers with std::stoi: a larger one is out of its range (and failed the plans, which
# compute with floats, with an OverflowError).
INT_MAX = 2**31 - 1


def _is_whole(value: str) -> bool:
    return bool(_WHOLE.fullmatch(value)) and len(value) <= len(str(INT_MAX)) and int(value) <= INT_MAX


def _is_positive(value: str) -> bool:
    return _is_whole(value) and int(value) > 0


def _is_overrides(value: str) -> bool:
    pairs = [pair.rsplit("=", 1) for pair in value.split(",") if pair]
    if not pairs or any(len(pair) != 2 or not all(pair) for pair in pairs):
        return False
    try:
        for pattern, _ in pairs:
            re.compile(pattern)
    except re.error:
        return False
    return True


# What the value of each flag must be, and how to say it.
_CHECKS: tuple[tuple[tuple[str, ...], Callable[[str], object], str], ...] = (
    (CTX, _is_whole, f"a whole number up to {INT_MAX}"),
    (CACHE_TYPE_K, CACHE_TYPE_BYTES.__contains__, f"a KV cache type ({', '.join(CACHE_TYPE_BYTES)})"),
    (CACHE_TYPE_V, CACHE_TYPE_BYTES.__contains__, f"a KV cache type ({', '.join(CACHE_TYPE_BYTES)})"),
    (FLASH_ATTN, _FLASH_ATTN.__contains__, "on, off or auto"),
    (UBATCH, _is_positive, f"a positive whole number up to {INT_MAX}"),
    (BATCH, _is_positive, f"a positive whole number up to {INT_MAX}"),
    (PARALLEL, lambda v: v == "-1" or _is_positive(v), f"a positive whole number up to {INT_MAX} or -1 (auto)"),
    (GPU_LAYERS, lambda v: v in ("auto", "all") or _is_whole(v), f"a whole number up to {INT_MAX}, auto or all"),
    (TENSOR_SPLIT, _is_split, "non-negative numbers separated by commas or slashes, at least one of them positive"),
    (N_CPU_MOE, _is_whole, f"a whole number up to {INT_MAX}"),
    (OVERRIDE_TENSOR, _is_overrides, "pattern=buffer type pairs separated by commas (e.g. exps=CPU)"),
)
_CHECK_OF = {flag: (valid, expected) for flags, valid, expected in _CHECKS for flag in flags}


def check_args(args: Sequence[str]) -> None:
    """Raise ValueError naming the first of the flags the planner and doctor read whose value is not one
    llama-server's help describes (for -fa, also its other spellings of on, off and auto). Every
    occurrence counts: llama-server parses them all, not only the last."""
    for name, value in _occurrences(args, _CHECK_OF.keys()):
        valid, expected = _CHECK_OF[name]
        if value is None:
            raise ValueError(f"{name} needs a value (got nothing after it)")
        if not valid(value):
            raise ValueError(f"{name} needs {expected} (got {value!r})")
