"""Every import in launcher/ points down the layers (issue 21's table, kept here as data in LAYERS), no two
packages import each other, and no modules import each other round a cycle.

Read from the source with `ast`, not from `sys.modules`: every import statement counts, at module level,
under `if TYPE_CHECKING:` and inside a function. A lazy import only defers a dependency (the module still
cannot work without the other one, and the cycle it hides comes back the day someone moves the import to
the top), and a TYPE_CHECKING import is a dependency of the types the module promises. A package's own
`__init__` imports of its modules are ordinary edges; the implicit import of a parent package is not one.

A new module at the top of launcher/ or a new package needs a row in LAYERS: the test says so.
`python tests/test_layers.py` prints the graph of packages (and top-level modules) with the arrows up.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "launcher"

# Lowest first: an import may go to its own layer or a lower one, never up. A name is a top-level module of
# launcher/ or a package (its modules take its layer). `launcher` is the package's own __init__: every
# import of a launcher module runs it first, so it can only be the ground floor (it holds the version).
LAYERS: dict[int, tuple[str, ...]] = {
    0: (
        "launcher",
        "errors",
        "schema",
        "schema_instances",
        "schema_plans",
        "schema_reload",
        "schema_front_door",
        "schema_rpc",
        "schema_gpus",
        "config_yaml",
        "address",
        "server_args",
        "events",
        "hub_ref",
        "regular_file",
        "process_start",
    ),  # standard library leaves
    1: (
        "config_fields",
        "config_daemon",
        "config_gpus",
        "config_supervision",
        "config_ollama",
        "config_model",
        "config_hub",
        "config_router",
        "config_rpc",
        "config",
        "config_env",
        "config_file",
        "config_change",
        "replicas",
    ),  # the settings
    2: ("client", "gpu"),  # readers: the daemon's HTTP client, the GPUs
    3: ("rpc",),  # the wire protocol and the peers' reader
    4: ("plan",),  # pure planning, owning its output type
    5: ("backends", "hub"),  # command line and environment from a model and its placement; hub models' headers
    6: ("statedir",),  # the state directory's layout and files
    7: ("supervise",),
    8: ("route",),
    9: ("api",),
    10: (
        "wiring",
        "reloading",
        "config_watch",
        "daemon",
        "daemon_notify",
        "local",
        "ad_hoc",
        "bridge",
        "upgrade_bridge",
        "upgrade",
        "cli_upgrade",
        "doctor",
        "doctor_findings",
        "doctor_gpus",
        "doctor_binaries",
        "doctor_models",
        "doctor_ports",
        "foreground",
        "cli",
        "cli_context",
        "cli_control",
        "cli_inspect",
        "cli_output",
        "cli_progress",
        "service",
        "systemd",
        "tinymodel",
        "__main__",
    ),
}
LAYER = {name: layer for layer, names in LAYERS.items() for name in names}

# Imports that still break a rule, each until the helper named removes it (issue 21); the lead empties
# this at merge. Keys: (importing module, imported module).
ALLOWED: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, dotted
    target: str  # the imported launcher module, dotted
    where: str  # file:line

    def __str__(self) -> str:
        return f"{self.where}: {self.source} -> {self.target}"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _known(name: str) -> str | None:
    """The launcher module ``name`` is, or is in (an attribute of a module is that module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imported(base: str, name: str) -> str:
    """What `from base import name` imports: the module base.name when there is one (`from launcher.plan
    import layout`), else base (a name defined in it)."""
    return f"{base}.{name}" if _known(f"{base}.{name}") != _known(base) else base


def _imports() -> Iterator[Import]:
    for module, path in MODULES.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, up level - 1
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                names = [_imported(base, alias.name) for alias in node.names]
            where = f"{path.relative_to(ROOT.parent)}:{getattr(node, 'lineno', 0)}"
            for name in names:
                target = _known(name) if name.split(".")[0] == "launcher" else None
                if target is not None and target != module:
                    yield Import(module, target, where)


IMPORTS = list(dict.fromkeys(_imports()))  # one per statement and module imported


def _unit(module: str) -> str:
    """A module's place in LAYERS: its package under launcher/, or itself at the top."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "launcher"


def _layer(module: str) -> int:
    unit = _unit(module)
    assert unit in LAYER, f"{MODULES[module]} is in no layer: add {unit!r} to LAYERS in {__file__}"
    return LAYER[unit]


def _breaking(found: list[str], rule: str) -> str:
    return f"{len(found)} import(s) {rule}:\n" + "\n".join(found)


def test_every_module_has_a_layer() -> None:
    assert len(MODULES) > 50  # the walk found the package (a test over nothing would pass)
    for module in MODULES:
        _layer(module)


def test_no_import_points_up() -> None:
    assert any(_layer(i.source) > _layer(i.target) for i in IMPORTS)  # the check sees downward imports
    up = [
        f"{i} (layer {_layer(i.source)} -> {_layer(i.target)})"
        for i in IMPORTS
        if _layer(i.source) < _layer(i.target) and (i.source, i.target) not in ALLOWED
    ]
    assert not up, _breaking(up, "point up the layers")


def test_no_two_packages_import_each_other() -> None:
    between = {
        (_unit(i.source), _unit(i.target)): i
        for i in IMPORTS
        if _unit(i.source) != _unit(i.target) and (i.source, i.target) not in ALLOWED
    }
    mutual = [f"{i}\n  and {between[(b, a)]}" for (a, b), i in sorted(between.items()) if a < b and (b, a) in between]
    assert not mutual, _breaking(mutual, "make two packages (or top-level modules) import each other")


def test_no_import_cycle() -> None:
    edges: dict[str, list[Import]] = {}
    for i in IMPORTS:
        if (i.source, i.target) not in ALLOWED:
            edges.setdefault(i.source, []).append(i)
    cycles = ["\n  then ".join(str(i) for i in cycle) for cycle in _cycles(edges)]
    assert not cycles, _breaking(cycles, "close a cycle (each line: the imports round it)")


def test_the_cycle_check_finds_a_cycle() -> None:
    """The check above passes on a tree without cycles: here it is seen to fail on one."""
    pairs = (("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"))
    a_b, b_c, c_a, c_d = (Import(s, t, f"{s}.py:1") for s, t in pairs)
    assert _cycles({"a": [a_b], "b": [b_c], "c": [c_d, c_a]}) == [[a_b, b_c, c_a]]
    assert _cycles({"a": [a_b], "b": [b_c], "c": [c_d]}) == []


def _cycles(edges: dict[str, list[Import]]) -> list[list[Import]]:
    """One cycle through each module that is on one (depth first; three colours)."""
    done: set[str] = set()
    path: list[Import] = []
    on_path: dict[str, int] = {}
    found: list[list[Import]] = []

    def visit(module: str) -> None:
        on_path[module] = len(path)
        for edge in edges.get(module, []):
            if edge.target in on_path:
                found.append([*path[on_path[edge.target] :], edge])
            elif edge.target not in done:
                path.append(edge)
                visit(edge.target)
                path.pop()
        del on_path[module]
        done.add(module)

    for module in sorted(edges):
        if module not in done:
            visit(module)
    return found


if __name__ == "__main__":
    arrows: dict[tuple[str, str], list[Import]] = {}
    for i in IMPORTS:
        if _unit(i.source) != _unit(i.target):
            arrows.setdefault((_unit(i.source), _unit(i.target)), []).append(i)
    up = sorted(pair for pair in arrows if LAYER.get(pair[0], 99) < LAYER.get(pair[1], 99))
    for unit in sorted({s for s, _ in arrows}, key=lambda u: (LAYER.get(u, 99), u)):
        targets = [f"{t}{' (UP)' if (unit, t) in up else ''}" for s, t in sorted(arrows) if s == unit]
        print(f"{unit} [{LAYER.get(unit, '?')}] -> {', '.join(targets)}")
    mutual = sorted((a, b) for a, b in arrows if a < b and (b, a) in arrows)
    print(f"arrows: {len(arrows)}, up: {len(up)} {up}, packages importing each other: {len(mutual)} {mutual}")
    print(f"module cycles: {len(_cycles({i.source: [j for j in IMPORTS if j.source == i.source] for i in IMPORTS}))}")
