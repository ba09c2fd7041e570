"""The header values the planner computes with, checked by type and against bounds before any is used.

A GGUF header is hostile until checked: a `block_count` written as a string, NaN or 10^9, an empty
`head_count_kv` array, would otherwise end in a traceback deep in the arithmetic or in minutes of it.
Each key gets one sentence naming it and what it should be. The bounds are far above any real model
(the largest have a few hundred layers and embeddings of 16k-32k) and keep planning small and linear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.errors import ConfigError

MAX_LAYERS = 16384
_WIDTH = 1 << 20  # embeddings, state and inner sizes
_HEADS = 1 << 16  # head counts, head sizes, experts
_FF = 1 << 24  # feed-forward widths
_CELLS = 1 << 32  # context lengths and windows


class ModelFileError(ConfigError):
    """A model file that is missing, not a regular file, not GGUF, cut short, or with a header that does
    not make sense."""


@dataclass(frozen=True)
class _Key:
    low: int
    high: int
    per_layer: bool = False  # a number, or an array of one per layer (OpenELM's head counts)
    flags: bool = False  # a period, or an array of per-layer flags (sliding_window_pattern)


# `{architecture}.KEY` as estimate.py and arch.py read them.
_ARCH_KEYS: dict[str, _Key] = {
    "block_count": _Key(1, MAX_LAYERS),
    "embedding_length": _Key(1, _WIDTH),
    "context_length": _Key(1, _CELLS),
    "vocab_size": _Key(0, _CELLS),
    "feed_forward_length": _Key(0, _FF, per_layer=True),
    "attention.head_count": _Key(0, _HEADS, per_layer=True),
    "attention.head_count_kv": _Key(0, _HEADS, per_layer=True),
    "attention.sliding_window": _Key(0, _CELLS),
    "attention.sliding_window_pattern": _Key(0, MAX_LAYERS, flags=True),
    "full_attention_interval": _Key(0, MAX_LAYERS),
    "nextn_predict_layers": _Key(0, MAX_LAYERS),
    **{
        f"attention.{kind}_length{variant}": _Key(0, _HEADS)
        for kind in ("key", "value")
        for variant in ("", "_swa", "_mla")
    },
    **{key: _Key(0, _HEADS) for key in ("expert_count", "expert_used_count", "expert_shared_count")},
    **{key: _Key(0, _FF) for key in ("expert_feed_forward_length", "expert_shared_feed_forward_length")},
    "wkv.head_size": _Key(0, _HEADS),
    "token_shift_count": _Key(0, _HEADS),
    "shortconv.l_cache": _Key(0, _HEADS),
    **{f"ssm.{key}": _Key(0, _WIDTH) for key in ("state_size", "inner_size", "conv_kernel", "group_count")},
    "ssm.time_step_rank": _Key(0, _WIDTH),
}
_SPLIT_COUNT = _Key(1, 99999)  # NAME-00001-of-99999.gguf


def _whole(value: Any) -> bool:
    """An integer (a bool counts: GGUF has a bool type), or a float with an integral finite value."""
    if isinstance(value, float):
        return math.isfinite(value) and value.is_integer()
    return isinstance(value, int)


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return "an empty array" if not value else f"an array of {len(value)} values"
    if isinstance(value, str):
        return repr(value[:40] + ("..." if len(value) > 40 else ""))
    if isinstance(value, int | float):
        return repr(value)
    return f"a {type(value).__name__}"


def _check(path: Path, name: str, value: Any, key: _Key, n_layer: int) -> None:
    number = f"a whole number from {key.low} to {key.high}"
    if key.flags:
        wanted = f"{number} or an array of per-layer flags"
        fine = (_whole(value) and key.low <= value <= key.high) or (
            isinstance(value, list) and all(_whole(v) for v in value)
        )
    elif key.per_layer:
        wanted = f"{number}, or an array of such numbers with one per layer ({n_layer})"
        items = value if isinstance(value, list) else [value]
        fine = (
            (not isinstance(value, list) or len(value) >= n_layer)
            and bool(items)
            and all(_whole(v) and key.low <= v <= key.high for v in items)
        )
    else:
        wanted = number
        fine = _whole(value) and key.low <= value <= key.high
    if not fine:
        raise ModelFileError(f"{path}: {name} is {_shown(value)}; it should be {wanted}")


def check_metadata(path: Path, metadata: dict[str, Any]) -> None:
    """ModelFileError naming the first key of ``metadata`` the planner reads whose value is of the wrong
    type or out of bounds."""
    architecture = metadata.get("general.architecture", "")
    if not isinstance(architecture, str):
        raise ModelFileError(f"{path}: general.architecture is {_shown(architecture)}; it should be a name")
    if "split.count" in metadata:
        _check(path, "split.count", metadata["split.count"], _SPLIT_COUNT, 0)
    prefix = f"{architecture}."
    block_count = metadata.get(f"{prefix}block_count")
    if block_count is not None:
        _check(path, f"{prefix}block_count", block_count, _ARCH_KEYS["block_count"], 0)
    n_layer = int(block_count or 0)
    for key, rule in _ARCH_KEYS.items():
        value = metadata.get(prefix + key)
        if value is not None:
            _check(path, prefix + key, value, rule, n_layer)
