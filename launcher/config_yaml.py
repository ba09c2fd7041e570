"""YAML as a configuration is read: with libyaml where present, bounded in size and nesting, without
aliases, and with every key given once.

A configuration has no use for aliases, and they are how a few hundred bytes expand into gigabytes (a
"billion laughs"): they are refused outright rather than bounded. Nesting is bounded because PyYAML's C
composer recurses once per level, and a line of a hundred thousand `[` overflows the C stack. Both are
checked on the event stream first (libyaml's parser keeps its own stack), before any node is built. A key
given twice is an error rather than the last one silently winning: it is how a pasted block goes wrong.
"""

from __future__ import annotations

import contextlib
import gc
import reprlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from launcher.errors import ConfigError
from launcher.regular_file import NotRegularFile, read_regular

MAX_CONFIG_BYTES = 16 * 1024 * 1024  # twenty thousand models take about 2 MiB
MAX_DEPTH = 64  # a real configuration nests five deep
_TOO_DEEP = f"nested more than {MAX_DEPTH} deep, which no configuration needs"

# libyaml's parser and composer are C; without it PyYAML's pure-Python ones are about three times slower.
try:
    from yaml import CSafeLoader as _Loader
except ImportError:  # PyYAML built without libyaml
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]


class _DuplicateKey(Exception):
    def __init__(self, mapping: Node, key: object, first_line: int, line: int) -> None:
        super().__init__(key)
        self.mapping, self.key, self.first_line, self.line = mapping, key, first_line, line


class _ConfigLoader(_Loader):
    """The safe loader, refusing a key given twice in one mapping."""

    root: Node | None = None

    def construct_document(self, node: Node) -> Any:
        self.root = node  # where a duplicate's mapping is looked for, to name its path
        return super().construct_document(node)

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        # BaseConstructor.construct_mapping, with the first line of each key kept.
        if not isinstance(node, MappingNode):
            return super().construct_mapping(node, deep)
        self.flatten_mapping(node)  # `<<:` merge keys
        mapping: dict[Any, Any] = {}
        lines: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                given = key in mapping
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a plain value, not a list or mapping", key_node.start_mark
                ) from None
            if given:
                raise _DuplicateKey(node, key, lines[key], line)
            lines[key] = line
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping


def read_config_bytes(path: Path) -> bytes:
    """The file's bytes, at most MAX_CONFIG_BYTES + 1 of them. Opened without blocking and read only when
    it is a regular file: a FIFO swapped in for it after a check by name would hold the reader forever."""
    try:
        return read_regular(path, MAX_CONFIG_BYTES)
    except NotRegularFile:
        raise ConfigError(f"configuration file {path} is not a regular file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None


def read_config_text(path: Path) -> str:
    """The file's text, refused past MAX_CONFIG_BYTES without reading the rest."""
    data = read_config_bytes(path)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is over {MAX_CONFIG_BYTES // 2**20} MiB, the most a configuration file may be")
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path} at line {line}: not UTF-8 text") from None


def parse_config_yaml(text: str, path: Path, section: str | None = None) -> Any:
    """The YAML document in ``text``, or ConfigError naming the file, the line and the problem. With
    ``section``, only that key of the top mapping is built (what a command that only talks to the daemon
    needs: a fraction of the time on a file of thousands of models)."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is over {MAX_CONFIG_BYTES // 2**20} MiB, the most a configuration file may be")
    try:
        with collector_paused():
            _check_events(text, path)
            loader = _ConfigLoader(text)
            try:
                node = loader.get_single_node()
                if node is None:
                    return None
                return loader.construct_document(_only(node, section) if section is not None else node)
            finally:
                loader.dispose()
    except _DuplicateKey as exc:
        where = ".".join(_path_to(loader.root, exc.mapping))
        raise ConfigError(
            f"{path}: {where + ': ' if where else ''}key {shown(exc.key)} given twice "
            f"(lines {exc.first_line} and {exc.line})"
        ) from None
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:  # a scalar YAML's types cannot hold
        raise ConfigError(f"{path}: a value cannot be read: {clip(str(exc), 120)}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        if problem == "exceeded maximum nesting depth":  # libyaml's own limit (1,000), met before ours
            problem = _TOO_DEEP
        raise ConfigError(f"{path}{line}: {problem}") from None


class _ConfigDumper(yaml.SafeDumper):
    """Writes every value out where it is used: a configuration may hold no aliases (the loader refuses
    them), and PyYAML would write one for an object that appears twice."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_config_yaml(data: Any) -> str:
    """``data`` as YAML the loader takes back."""
    return yaml.dump(data, Dumper=_ConfigDumper)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cycle collector off while a configuration is built: each of its passes walks every object
    made so far, for nothing (nodes and settings hold no cycles); on twenty thousand models that was three
    quarters of the YAML's time and half of the validation's, and made the load grow faster than the file."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _check_events(text: str, path: Path) -> None:
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.AliasEvent):
            raise ConfigError(
                f"{path} at line {_line(event.start_mark)}: YAML aliases (*{clip(str(event.anchor), 40)}) "
                "are not accepted in a configuration: write the value out"
            )
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise ConfigError(f"{path} at line {_line(event.start_mark)}: {_TOO_DEEP}")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _only(root: Node, key: str) -> Node:
    """The top mapping with only ``key`` in it (every time it is given, so that twice is still an error)."""
    if not isinstance(root, MappingNode):
        return root
    pairs = [(k, v) for k, v in root.value if isinstance(k, ScalarNode) and k.value == key]
    return MappingNode(root.tag, pairs, root.start_mark, root.end_mark, root.flow_style)


def _line(mark: object) -> int | str:
    # A pure-Python or a libyaml Mark: both have the line, counted from 0.
    line = getattr(mark, "line", None)
    return line + 1 if isinstance(line, int) else "?"


def _path_to(root: Node | None, target: Node) -> list[str]:
    """The keys that lead from the document's root to ``target`` (indexes for list items)."""
    stack: list[tuple[Node, list[str]]] = [(root, [])] if root is not None else []
    while stack:
        node, keys = stack.pop()
        if node is target:
            return keys
        if isinstance(node, MappingNode):
            for key, value in node.value:
                stack.append((value, [*keys, clip(key.value, 60) if isinstance(key, ScalarNode) else "?"]))
        elif isinstance(node, SequenceNode):
            stack.extend((value, [*keys, str(i)]) for i, value in enumerate(node.value))
    return []


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters: what an error message shows of a value of any size."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


# A repr that stops early: what a 500-byte file expands to may take a hundred megabytes to spell out.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 60, 60


def shown(value: object, limit: int = 60) -> str:
    """``value``'s repr, bounded in the work and cut to ``limit`` characters."""
    return clip(_REPR.repr(value), limit)
