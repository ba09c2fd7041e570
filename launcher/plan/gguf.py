"""Facts from a GGUF file's header, read with the `gguf` package."""

from __future__ import annotations

from pathlib import Path

import gguf


def block_count(path: Path) -> int | None:
    """The model's number of repeating layers (`{arch}.block_count`), or None when the file does not say."""
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError):
        return None
    arch_field = reader.get_field("general.architecture")
    if arch_field is None:
        return None
    arch = arch_field.contents()
    field = reader.get_field(f"{arch}.block_count")
    return int(field.contents()) if field is not None else None
