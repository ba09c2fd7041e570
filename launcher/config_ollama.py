"""What an Ollama entry's `ollama serve` is told through its environment (`models.NAME.ollama`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from launcher.config_fields import MEMORY_MAX_MIB, MemoryMib, StrictSettings


class OllamaSettings(StrictSettings):
    """What `ollama serve` is told through its environment (OLLAMA_*)."""

    keep_alive: str = Field(
        default="-1", description="`OLLAMA_KEEP_ALIVE`: `-1` keeps the model loaded, the launcher decides when it goes."
    )
    num_parallel: Annotated[int, Field(ge=1)] | None = Field(default=None, description="`OLLAMA_NUM_PARALLEL`.")
    max_loaded_models: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="`OLLAMA_MAX_LOADED_MODELS`."
    )
    flash_attention: bool | None = Field(default=None, description="`OLLAMA_FLASH_ATTENTION`.")
    kv_cache_type: Literal["f16", "q8_0", "q4_0"] | None = Field(default=None, description="`OLLAMA_KV_CACHE_TYPE`.")
    gpu_overhead_mib: MemoryMib | None = Field(default=None, description="`OLLAMA_GPU_OVERHEAD`, in MiB.")
    models_dir: Path | None = Field(
        default=None, description="`OLLAMA_MODELS`; also where the planner looks for the model's blob."
    )
    size_mib: Annotated[int, Field(gt=0, le=MEMORY_MAX_MIB)] | None = Field(
        default=None, description="The model's size, for planning when its blob cannot be found."
    )
    registry: Annotated[str, Field(pattern=r"^https?://[^\s/]+(/\S*)?$")] = Field(
        default="https://registry.ollama.ai",
        description="Where a model not in the store (and without `size_mib`) is planned from before Ollama "
        "pulls it: the registry whose manifest lists the size of its layers.",
    )
