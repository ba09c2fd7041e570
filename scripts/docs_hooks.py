"""MkDocs hooks (mkdocs.yml `hooks:`): the parts of the docs that are generated from the code, so they
cannot drift from it. A page asks for one with a line of its own, `<!-- generated: NAME -->`:

- `configuration`: every key of `launcher.config.Settings`, walked recursively through the pydantic
  models: its path, type, default and description (a key without a description fails the build);
- `cli`: the help of every command of the CLI's argparse parser;
- `api`: the REST API from the OpenAPI document of a real daemon (`launcher serve` on a free loopback
  port, with a token and `auth_reads: always`, so the 401 answers are in it too);
- `metrics`: every metric family the same daemon serves on `/metrics`, with its type, labels and help;
- `layout`: the package's modules, each with the first paragraph of its docstring.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import httpx
from mkdocs.exceptions import PluginError
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from launcher.hub_ref import HubRef

_MARKER = re.compile(r"^<!-- generated: ([a-z]+) -->$", re.MULTILINE)


def on_page_markdown(markdown: str, **_kwargs: Any) -> str:
    return _MARKER.sub(lambda match: _generate(match.group(1)), markdown)


def _generate(name: str) -> str:
    generators = {
        "configuration": configuration_reference,
        "cli": cli_reference,
        "api": api_reference,
        "layout": layout_reference,
        "metrics": metrics_reference,
    }
    if name not in generators:
        raise PluginError(f"<!-- generated: {name} -->: no such generator (known: {', '.join(generators)})")
    return generators[name]()


# The configuration -------------------------------------------------------------------------------------

_NAMES = {
    int: "integer",
    float: "number",
    str: "string",
    bool: "boolean",
    Path: "path",
    type(None): "null",
    HubRef: "hub reference (`hf:...`)",
}
_BOUNDS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤", "min_length": "length ≥"}


def _section_id(path: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-")


def _nested(annotation: Any) -> tuple[str, type[BaseModel]] | None:
    """The section a field opens, as the suffix its keys' paths take, and its model."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "", annotation
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is dict and isinstance(args[1], type) and issubclass(args[1], BaseModel):
        return ".NAME", args[1]
    if origin is list and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return "[]", args[0]
    return None


def _bounds(metadata: list[Any]) -> str:
    words = []
    for item in metadata:
        if isinstance(item, FieldInfo):
            words.append(_bounds(item.metadata))
            continue
        for attribute, sign in _BOUNDS.items():
            if getattr(item, attribute, None) is not None:
                words.append(f"{sign} {getattr(item, attribute)}")
    return ", ".join(word for word in words if word)


def _type_name(annotation: Any, metadata: list[Any] | None = None) -> str:
    bounds = _bounds(metadata or [])
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        name = _type_name(args[0], list(args[1:]))
    elif origin is Literal:
        name = " or ".join(f"`{json.dumps(arg)}`" for arg in args)
    elif origin in (Union, types.UnionType):
        name = " or ".join(_type_name(arg) for arg in args)
    elif origin is list:
        name = f"list of {_type_name(args[0])}"
    elif origin is tuple:
        name = f"[{', '.join(_type_name(arg) for arg in args)}]"
    elif origin is dict:
        name = f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        name = "section"
    else:
        name = _NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))
    return f"{name} ({bounds})" if bounds else name


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    factory = field.default_factory
    if factory is not None:
        if factory in (list, dict):
            return "`[]`" if factory is list else "`{}`"
        if isinstance(factory, type) and issubclass(factory, BaseModel):
            return "its keys' defaults"
        return "see description"
    value = list(field.default) if isinstance(field.default, tuple) else field.default
    return f"`{json.dumps(value)}`"


def _description(field: FieldInfo, model: type[BaseModel] | None) -> str | None:
    text = field.description or (model.__doc__ if model is not None else None)
    return _cell(text) if text else None


def _sections(model: type[BaseModel], path: str) -> Iterator[tuple[str, type[BaseModel]]]:
    yield path, model
    for name, field in model.model_fields.items():
        if not field.exclude and (nested := _nested(field.annotation)) is not None:
            suffix, inner = nested
            yield from _sections(inner, f"{path}.{name}{suffix}" if path else f"{name}{suffix}")


def configuration_reference(settings: type[BaseModel] | None = None) -> str:
    """Every key of the settings (`launcher.config.Settings` by default), one table per section."""
    if settings is None:
        from launcher.config import Settings

        settings = Settings
    lines: list[str] = []
    undescribed: list[str] = []
    for path, model in _sections(settings, ""):
        if path:
            lines += [f"### `{path}` {{#{_section_id(path)}}}", "", _description(FieldInfo(), model) or "", ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            if field.exclude:  # not a key of the file (where the settings were read from)
                continue
            key = f"{path}.{name}" if path else name
            nested = _nested(field.annotation)
            description = _description(field, nested[1] if nested else None)
            if description is None:
                undescribed.append(key)
            kind = _type_name(field.annotation, field.metadata)
            if nested is not None:
                kind = f"[{kind}](#{_section_id(key + nested[0])})"
            lines.append(f"| `{key}` | {kind} | {_default(field)} | {description or ''} |")
        lines.append("")
    if undescribed:
        raise PluginError(
            f"configuration keys without a description: {', '.join(undescribed)} "
            "(give each a Field(description=...) in launcher/config.py or its section's launcher/config_*.py)"
        )
    return "\n".join(lines)


# The command line --------------------------------------------------------------------------------------


def _commands(parser: argparse.ArgumentParser, prefix: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from _commands(sub, f"{prefix} {name}")


def cli_reference() -> str:
    """Each command's `--help`, as the parser prints it (80 columns wide, whatever the terminal)."""
    from launcher.cli import build_parser

    parser = build_parser()
    lines: list[str] = []
    for title, each in [("launcher", parser), *_commands(parser, "launcher")]:
        each.formatter_class = functools.partial(argparse.HelpFormatter, width=80)
        lines += [f"### `{title}`", "", "```text", each.format_help().rstrip(), "```", ""]
    return "\n".join(lines)


# The REST API ------------------------------------------------------------------------------------------


def daemon_answers(paths: tuple[str, ...] = ("/openapi.json", "/metrics"), timeout_s: float = 60.0) -> dict[str, str]:
    """What a real daemon answers at ``paths``, started for this and stopped: with a token and
    `auth_reads: always` (so every read lists its 401), one simulated GPU and one model that is not started
    (so that the instance and GPU metrics have their labels)."""
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        token = Path(tmp, "token")
        token.write_text("docs-token\n")
        token.chmod(0o600)
        from launcher.tinymodel import write_tiny_llama

        model = write_tiny_llama(Path(tmp, "model.gguf"), header_only=True)
        config = Path(tmp, "launcher.yaml")
        config.write_text(
            json.dumps(
                {
                    "daemon": {"port": port, "state_dir": f"{tmp}/state", "token_file": str(token)}
                    | {"auth_reads": "always"},
                    "gpus": {"backend": "sim", "sim": [{"name": "Simulated GPU", "memory_mib": 24576}]},
                    "models": {"example": {"model": str(model), "autostart": False}},
                }
            )
        )
        env = {key: value for key, value in os.environ.items() if not key.startswith("LAUNCHER_")}
        command = [sys.executable, "-m", "launcher", "--config", str(config), "serve"]
        daemon = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + timeout_s
            with httpx.Client(
                base_url=f"http://127.0.0.1:{port}", headers={"Authorization": "Bearer docs-token"}
            ) as http:
                while time.monotonic() < deadline and daemon.poll() is None:
                    try:
                        # One request to the front door first: its metrics then show their labels.
                        http.post("/v1/chat/completions", json={"model": "example", "messages": []})
                        return {path: http.get(path).raise_for_status().text for path in paths}
                    except httpx.TransportError:
                        time.sleep(0.1)
        finally:
            daemon.terminate()
            _, stderr = daemon.communicate(timeout=30)
    raise PluginError(f"the daemon did not answer (exit {daemon.returncode}): {stderr.strip()[-2000:]}")


@functools.cache
def _served() -> dict[str, str]:
    """One daemon per build for every page that needs one."""
    return daemon_answers()


def _schema_type(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "anyOf" in schema:
        return " or ".join(_schema_type(each) for each in schema["anyOf"])
    if "enum" in schema:
        return " or ".join(f"`{json.dumps(value)}`" for value in schema["enum"])
    if schema.get("type") == "array":
        return f"list of {_schema_type(schema.get('items', {}))}"
    if schema.get("type") == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"mapping to {_schema_type(schema['additionalProperties'])}"
    return str(schema.get("type", "any"))


def _cell(text: str | None) -> str:
    """Text as one table cell: on one line, its pipes and angle brackets escaped outside code spans."""
    parts = " ".join((text or "").split()).split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def api_reference(document: dict[str, Any] | None = None) -> str:
    """Every path and method with its parameters, body and answers, then every schema with its fields."""
    document = document if document is not None else json.loads(_served()["/openapi.json"])
    lines: list[str] = []
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            lines += [
                f"### {method.upper()} `{path}`",
                "",
                _cell(operation.get("description") or operation.get("summary")),
                "",
            ]
            if parameters := operation.get("parameters"):
                lines += ["| parameter | in | type | required | description |", "|---|---|---|---|---|"]
                for each in parameters:
                    kind = _schema_type(each.get("schema", {}))
                    needed = "yes" if each.get("required") else "no"
                    lines.append(
                        f"| `{each['name']}` | {each['in']} | {kind} | {needed} | {_cell(each.get('description'))} |"
                    )
                lines.append("")
            if body := operation.get("requestBody"):
                for media, content in body["content"].items():
                    lines += [f"Body ({media}): {_schema_type(content.get('schema', {}))}", ""]
            lines += ["| status | answer | content |", "|---|---|---|"]
            for status, answer in sorted(operation["responses"].items()):
                content = ", ".join(
                    f"{media}: {_schema_type(each.get('schema', {}))}" if each.get("schema") else media
                    for media, each in answer.get("content", {}).items()
                )
                lines.append(f"| {status} | {_cell(answer.get('description'))} | {content} |")
            lines.append("")
    lines += ["## Schemas", ""]
    for name, schema in document.get("components", {}).get("schemas", {}).items():
        lines += [f"### {name}", "", _cell(schema.get("description")), ""]
        if properties := schema.get("properties"):
            required = set(schema.get("required", []))
            lines += ["| field | type | required | description |", "|---|---|---|---|"]
            for field, each in properties.items():
                needed = "yes" if field in required else "no"
                lines.append(f"| `{field}` | {_schema_type(each)} | {needed} | {_cell(each.get('description'))} |")
            lines.append("")
        elif "enum" in schema:
            lines += [f"One of {_schema_type(schema)}.", ""]
    return "\n".join(lines)


# The metrics ---------------------------------------------------------------------------------------------


def metrics_reference(exposition: str | None = None) -> str:
    """Every metric family a daemon exposes on `/metrics`: its name, type, labels and help, as served."""
    exposition = exposition if exposition is not None else _served()["/metrics"]
    lines = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for family in text_string_to_metric_families(exposition):
        if family.name.startswith(("python_", "process_")):
            continue  # prometheus_client's own, the same in every program
        labels = sorted({label for sample in family.samples for label in sample.labels} - {"le", "quantile"})
        shown = ", ".join(f"`{label}`" for label in labels) or ("none" if family.samples else "—")
        suffix = "_total" if family.type == "counter" else ""
        lines.append(f"| `{family.name}{suffix}` | {family.type} | {shown} | {_cell(family.documentation)} |")
    return "\n".join(lines)


# The code's layout -------------------------------------------------------------------------------------


def layout_reference(package: Path | None = None) -> str:
    """The launcher package's modules and subpackages, each with its docstring's first paragraph (a
    package's lists its modules): what the code says of itself, read without importing it."""
    if package is None:
        import launcher

        package = Path(launcher.__file__).parent
    lines = ["| module | what it holds |", "|---|---|"]
    for path in sorted(package.iterdir()):
        source = path / "__init__.py" if path.is_dir() else path
        if source.suffix != ".py" or not source.is_file() or path.name.startswith("_"):
            continue
        text = ast.get_docstring(ast.parse(source.read_text())) or ""
        name = f"`{package.name}/{path.name}/`" if path.is_dir() else f"`{package.name}/{path.name}`"
        lines.append(f"| {name} | {_cell(text.split(chr(10) + chr(10))[0])} |")
    return "\n".join(lines) + "\n"
