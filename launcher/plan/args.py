"""Reading llama-server options out of a model's pass-through `args`, as llama.cpp would."""

from __future__ import annotations

from collections.abc import Sequence


def arg_value(args: Sequence[str], *flags: str) -> str | None:
    """The value of the last of ``flags`` in ``args`` (llama.cpp takes the last); `--flag=value` too."""
    value = None
    for i, arg in enumerate(args):
        name, eq, inline = arg.partition("=")
        if name in flags:
            value = inline if eq else (args[i + 1] if i + 1 < len(args) else None)
    return value
