"""The Hugging Face hub's settings (`hub:`), for models written `hf:...`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field

from launcher.config_fields import StrictSettings


class HubSettings(StrictSettings):
    """The Hugging Face hub, for models written `hf:...`. Its address is `HF_ENDPOINT`, and its token
    `HF_TOKEN` (or the library's login) unless `token_file` names one: the `huggingface_hub` library's own."""

    token_file: Path | None = Field(
        default=None, description="A file holding the hub token, for gated repos; default `HF_TOKEN` or the login."
    )
    max_header_mib: Annotated[int, Field(ge=1, le=4096)] = Field(
        default=64,
        description="The most of a GGUF file's header read to plan it (a 128k-token vocabulary takes a few "
        "MiB); a larger header is refused.",
    )
