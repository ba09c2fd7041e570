"""`launcher up hf:ORG/REPO[:QUANT]` with no configuration entry: the hub model joins the settings of this
run under a name derived from the repo (printed), and is planned, downloaded and started like any model.
Only a run in the foreground takes one: a daemon serves its configuration file, which does not name it."""

from __future__ import annotations

import re

from launcher.config import Settings
from launcher.config_model import ModelSettings
from launcher.errors import ConfigError
from launcher.hub_ref import HubRef, is_hub_ref, parse_hub_ref

_NAME_MAX = 64
_NOT_IN_NAME = re.compile(r"[^a-z0-9._-]+")


def derived_name(ref: HubRef) -> str:
    """`hf:bartowski/Qwen2.5-72B-Instruct-GGUF:IQ3_XXS` -> `qwen2.5-72b-instruct-iq3_xxs`: the repo's name
    without its `-GGUF`, then the quant (or the file's name without `.gguf`), lower case."""
    base = ref.repo.split("/", 1)[1].lower()
    base = re.sub(r"[-_.]?gguf$", "", base) or base
    if ref.file is not None:
        base = ref.file.rsplit("/", 1)[-1][: -len(".gguf")].lower()
    elif ref.quant is not None:
        base = f"{base}-{ref.quant.lower()}"
    name = _NOT_IN_NAME.sub("-", base).strip(".-")[:_NAME_MAX]
    return name or "hub-model"


def with_ad_hoc(settings: Settings, names: list[str]) -> tuple[Settings, list[str]]:
    """The settings with an entry for each hub reference among ``names`` that the configuration does not
    name, and the names to start (a reference replaced by its derived name)."""
    models = dict(settings.models)
    started = []
    for name in names:
        if name in models or not is_hub_ref(name):
            started.append(name)
            continue
        try:
            ref = parse_hub_ref(name)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        derived = derived_name(ref)
        if derived in models and models[derived].model != ref:
            raise ConfigError(
                f"{name} would run as {derived!r}, which the configuration names for another model",
                hint="add it to the configuration under a name of its own",
            )
        models.setdefault(derived, ModelSettings(model=ref))
        started.append(derived)
    if len(models) == len(settings.models):
        return settings, started
    return settings.model_copy(update={"models": models}), started


def ad_hoc_names(settings: Settings, names: list[str]) -> list[str]:
    """The hub references among ``names`` that the configuration does not name."""
    return [n for n in names if is_hub_ref(n) and n not in settings.models]
