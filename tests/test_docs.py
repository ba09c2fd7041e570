"""The docs site: its configuration reference names every key of the settings' models (it is generated
from them, and a key without a description fails the build), the command line's page covers every command,
and the README stays one screen that keeps the two commands and links only to what exists. The whole site
is built with `mkdocs build --strict` by scripts/test."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
from mkdocs.exceptions import PluginError
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, Field

from launcher.cli import build_parser
from launcher.config import Settings
from launcher.config_file import parse_settings
from scripts.docs_hooks import (
    api_reference,
    cli_reference,
    configuration_reference,
    daemon_answers,
    layout_reference,
    metrics_reference,
)
from tests.conftest import MARK

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key's path, as the reference writes it: `models.NAME.ctx`, `peers[].url`."""
    found = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        path = f"{prefix}{name}"
        found.append(path)
        annotation: Any = field.annotation
        origin, args = get_origin(annotation), get_args(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found += keys(annotation, f"{path}.")
        elif origin is dict and isinstance(args[1], type) and issubclass(args[1], BaseModel):
            found += keys(args[1], f"{path}.NAME.")
        elif origin is list and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            found += keys(args[0], f"{path}[].")
    return found


def test_the_configuration_reference_names_every_key_with_its_description() -> None:
    reference = configuration_reference()
    every = keys(Settings)
    assert {"daemon.port", "models.NAME.restart.burst", "gpus.sim[].memory_mib", "peers[].url"} <= set(every)
    rows = {line.split("|")[1].strip(" `"): line for line in reference.splitlines() if line.startswith("| `")}
    assert sorted(rows) == sorted(every)
    assert rows["daemon.port"].split("|")[3:5] == [
        " `8400` ",
        " The API's port: REST API, front door, dashboard and metrics. ",
    ]


def test_a_key_without_a_description_fails_the_build() -> None:
    class Section(BaseModel):
        """A section."""

        said: int = Field(default=1, description="Described.")
        unsaid: int = 2

    class Root(BaseModel):
        section: Section = Field(default_factory=Section)

    with pytest.raises(PluginError, match=r"without a description: section\.unsaid \("):
        configuration_reference(Root)


def test_the_configuration_example_loads() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    examples = re.findall(r"```yaml\n(.*?)```", page, re.DOTALL)
    assert examples
    for example in examples:
        assert parse_settings(example, ROOT / "launcher.yaml").models


def test_the_command_line_page_covers_every_command() -> None:
    table = [line for line in (ROOT / "docs" / "cli.md").read_text().splitlines() if line.startswith("| `")]
    help_text = cli_reference()
    subcommands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert subcommands is not None and "serve" in subcommands
    for name in subcommands:
        assert any(f"`{name}" in row for row in table), name  # the hand-written table
        assert f"### `launcher {name}`" in help_text, name  # the generated help
    assert "### `launcher service install`" in help_text


def test_the_api_and_metrics_references_are_a_real_daemons(
    leaves_no_process: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MARK, leaves_no_process)  # the daemon it starts carries the mark: proven gone after
    answers = daemon_answers()
    document = json.loads(answers["/openapi.json"])
    assert "401" in document["paths"]["/gpus"]["get"]["responses"]  # started with a token, reads locked
    reference = api_reference(document)
    for path, methods in document["paths"].items():
        for method in methods:
            assert f"### {method.upper()} `{path}`" in reference
    for schema in document["components"]["schemas"]:
        assert f"### {schema}\n" in reference
    assert "| `authorization` | header | string or null | no | Bearer &lt;the API token&gt; |" in reference
    metrics = metrics_reference(answers["/metrics"])
    for family in text_string_to_metric_families(answers["/metrics"]):
        if family.name.startswith("launcher_"):
            assert f"| `{family.name}" in metrics, family.name
    assert "| `launcher_requests_total` | counter | `code`, `instance`, `model` |" in metrics


def test_the_layout_lists_every_subpackage() -> None:
    layout = layout_reference()
    for package in ("api", "gpu", "plan", "route", "rpc", "statedir", "supervise"):
        assert re.search(rf"^\| `launcher/{package}/` \| \S", layout, re.MULTILINE), package


def test_the_readme_is_one_screen_with_the_two_commands() -> None:
    assert len(README.splitlines()) < 120
    for command in ("scripts/demo", "scripts/test"):
        assert f"```sh\n{command}\n```" in README
        assert (ROOT / command).is_file()
    assert "exec scripts/test" in (ROOT / ".ci" / "run").read_text()


def test_the_readme_links_to_what_exists() -> None:
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    assert "docs/configuration.md" in targets
    for target in targets:
        if "://" not in target:
            assert (ROOT / target).exists(), target
