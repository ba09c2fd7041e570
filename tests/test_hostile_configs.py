"""Hostile configurations and state files: each is refused (or skipped) with one sentence, quickly, and never
with a traceback. YAML that expands (aliases) or nests without end, keys given twice, oversized files, model
names that break file names or URLs, token files others can read, and a children.json written by anyone."""

from __future__ import annotations

import json
import logging
import os
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from launcher.config_daemon import LOG_KEEP_MAX, LOG_MAX_MIB
from launcher.config_fields import MEMORY_MAX_MIB
from launcher.config_file import load_settings
from launcher.config_gpus import HISTORY_MAX
from launcher.config_model import CTX_MAX
from launcher.errors import ConfigError
from launcher.statedir.owner import StateDirLock
from launcher.supervise.leftovers import ChildRegistry
from tests.conftest import ConfigWriter, Daemon, free_port, read_of_a_fifo, run_cli, write_secret

TOO_DEEP = "nested more than 64 deep, which no configuration needs"
RULE = (
    "does not follow the rule for names: 1 to 64 ASCII letters, digits, '.', '_' or '-', not starting with '.' or '-'"
)


def billion_laughs(levels: int = 9) -> str:
    """Each anchor a list of nine aliases of the one before: 9**9 strings from about 600 bytes."""
    lines = ['l0: &l0 "lol"']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


# name -> (the file's text, the sentence with {path} for the file)
HOSTILE_YAML: dict[str, tuple[str, str]] = {
    "alias bomb": (
        billion_laughs(),
        "{path} at line 2: YAML aliases (*l0) are not accepted in a configuration: write the value out",
    ),
    "merge key": (
        "models:\n  a: &base {model: a.gguf, ctx: 256}\n  b:\n    <<: *base\n    ctx: 512\n",
        "{path} at line 4: YAML aliases (*base) are not accepted in a configuration: write the value out",
    ),
    "key twice": (
        "models:\n  tiny:\n    model: x.gguf\n    ctx: 256\n    port: auto\n\n    ctx: 512\n",
        "{path}: models.tiny: key 'ctx' given twice (lines 4 and 7)",
    ),
    "section twice": (
        "models: {}\ngpus: {backend: none}\nmodels: {}\n",
        "{path}: key 'models' given twice (lines 1 and 3)",
    ),
    "flow nesting": ("a: " + "[" * 100 + "]" * 100, "{path} at line 1: " + TOO_DEEP),
    "flow nesting past libyaml's own limit": ("a: " + "[" * 100_000 + "]" * 100_000, "{path} at line 1: " + TOO_DEEP),
    "block nesting": (
        "a:\n" + "- " * 50_000 + "x\n",
        "{path} at line 2: " + TOO_DEEP,
    ),
    "too large": ("# " + "x" * (16 * 2**20) + "\n", "{path} is over 16 MiB, the most a configuration file may be"),
    "long name": (
        f"models:\n  {'a' * 300}:\n    model: x.gguf\n",
        f"{{path}}: models: model name '{'a' * 78}… (300 characters) {RULE}",
    ),
    "a number too long for Python": (
        "daemon:\n  port: " + "9" * 5000 + "\n",
        "{path}: a value cannot be read: Exceeds the limit (4300 digits) for integer string conversion: value has "
        "5000 digits; use sys.set_int_max_str_digits() …",
    ),
    "a date that is none": (
        "models:\n  tiny:\n    model: 2024-13-45\n",
        "{path}: a value cannot be read: month must be in 1..12",
    ),
    "a timestamp tag on a word": (
        "models: !!timestamp abc\n",
        "{path}: a value cannot be read: 'NoneType' object has no attribute 'groupdict'",
    ),
    "huge value": (
        "models: [" + ",".join(["[1,2,3,4,5,6,7,8]"] * 100_000) + "]",
        "{path}: models: should be a valid dictionary "
        "(got [[1, 2, 3, 4, ...], [1, 2, 3, 4, ...], [1, 2, 3, 4, ...], […)",
    ),
}


@pytest.mark.parametrize("case", HOSTILE_YAML)
def test_hostile_yaml_is_one_sentence(case: str, tmp_path: Path) -> None:
    text, sentence = HOSTILE_YAML[case]
    path = tmp_path / "launcher.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value) == sentence.format(path=path)


@pytest.mark.parametrize(
    "case", ["alias bomb", "key twice", "flow nesting", "too large", "long name", "a date that is none"]
)
def test_hostile_yaml_through_the_cli(case: str, tmp_path: Path, marked_env: dict[str, str]) -> None:
    text, sentence = HOSTILE_YAML[case]
    path = tmp_path / "launcher.yaml"
    path.write_text(text)
    result = run_cli("--config", str(path), "plan", "tiny", env=marked_env)
    assert (result.returncode, result.stderr) == (2, f"launcher: {sentence.format(path=path)}\n")


def test_many_problems_are_cut_short(tmp_path: Path) -> None:
    models = "".join(f"  m{i}: {{model: a.gguf, ctx: lots}}\n" for i in range(100))
    path = tmp_path / "launcher.yaml"
    path.write_text("models:\n" + models)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    lines = str(caught.value).splitlines()
    assert len(lines) == 21
    assert (
        lines[0]
        == f"{path}: models.m0.ctx: should be a valid integer, unable to parse string as an integer (got 'lots')"
    )
    assert lines[-1] == f"{path}: and 80 more problems"


@pytest.mark.parametrize("name", ["a" * 65, "../up", "a/b", "-flag", ".hidden", "a b", "mödel", "a:b", "a@1", ""])
def test_model_names_that_break_files_urls_or_labels_are_refused(name: str, tmp_path: Path) -> None:
    path = tmp_path / "launcher.yaml"
    path.write_text(json.dumps({"models": {name: {"model": "x.gguf"}}}))
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    length = " (65 characters)" if len(name) == 65 else ""
    assert str(caught.value) == f"{path}: models: model name {name!r}{length} {RULE}"


@pytest.mark.parametrize("name", ["a" * 64, "qwen2.5-7b_q4", "_x", "7B", "Llama-3.1-70B-Instruct"])
def test_model_names_that_work_everywhere_are_taken(name: str, tmp_path: Path) -> None:
    path = tmp_path / "launcher.yaml"
    path.write_text(json.dumps({"models": {name: {"model": "x.gguf"}}}))
    assert list(load_settings(path).models) == [name]


# ---- secret files ------------------------------------------------------------------------------------


def token_config(tmp_path: Path, mode: int, extra: str = "") -> tuple[Path, Path]:
    token = write_secret(tmp_path / "token", "s3cret\n")
    token.chmod(mode)
    path = tmp_path / "launcher.yaml"
    path.write_text(f"daemon: {{token_file: token, state_dir: state, port: {free_port()}{extra}}}\n")
    return path, token


@pytest.mark.parametrize(
    ("mode", "problem"),
    [
        (0o644, "readable by others (mode 0644)"),
        (0o640, "readable by its group (mode 0640)"),
        (0o620, "writable by its group (mode 0620)"),
    ],
)
def test_a_token_file_others_can_read_is_refused(
    mode: int, problem: str, tmp_path: Path, marked_env: dict[str, str]
) -> None:
    path, token = token_config(tmp_path, mode)
    sentence = f"{path}: daemon.token_file: {token} is {problem}: run chmod 600 {token}"
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value) == sentence
    for command in (["status"], ["plan", "tiny"]):  # the daemon section alone, and the whole file
        result = run_cli("--config", str(path), *command, env=marked_env)
        assert (result.returncode, result.stderr) == (2, f"launcher: {sentence}\n")


def test_a_peers_token_file_is_checked_too(tmp_path: Path) -> None:
    token = tmp_path / "peer.token"
    token.write_text("peer\n")
    token.chmod(0o604)
    path = tmp_path / "launcher.yaml"
    path.write_text(f"peers: [{{url: 'http://127.0.0.1:{free_port()}', token_file: peer.token}}]\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert (
        str(caught.value)
        == f"{path}: peers.0.token_file: {token} is readable by others (mode 0604): run chmod 600 {token}"
    )


def test_allow_readable_secrets_accepts_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path, token = token_config(tmp_path, 0o644, ", allow_readable_secrets: true")
    with caplog.at_level(logging.WARNING, logger="launcher"):
        settings = load_settings(path)
    assert settings.daemon.token_file == token
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: daemon.token_file: {token} is readable by others (mode 0644): run chmod 600 {token} "
        "(accepted: daemon.allow_readable_secrets is true)"
    ]


def test_a_token_file_of_the_owner_alone_is_taken(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for mode in (0o600, 0o400):
        path, token = token_config(tmp_path, mode)
        assert load_settings(path).daemon.token_file == token
    assert not caplog.records


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_another_users_token_file_may_be_readable_by_its_group(tmp_path: Path) -> None:
    # As Kubernetes mounts a Secret for the pod's fsGroup: root's file, 0440, group the pod's.
    path, token = token_config(tmp_path, 0o440)
    os.chown(token, 4321, 4321)
    assert load_settings(path).daemon.token_file == token
    token.chmod(0o444)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert (
        str(caught.value)
        == f"{path}: daemon.token_file: {token} is readable by others (mode 0444): run chmod o-rwx {token}"
    )


# ---- children.json -----------------------------------------------------------------------------------

GOOD = {"instance": "tiny", "pid": 2**31 - 1, "create_time": 1.0, "exe": "llama-server"}  # no such process
BAD_ENTRIES: list[tuple[object, str]] = [
    ({**GOOD, "pid": -1}, "pid -1 is not a process id"),
    ({**GOOD, "pid": "abc"}, "pid 'abc' is not a process id"),
    ({**GOOD, "pid": True}, "pid True is not a process id"),
    ({**GOOD, "pid": 2**40}, f"pid {2**40} is not a process id"),
    ({**GOOD, "create_time": "soon"}, "create_time 'soon' is not a time"),
    ({**GOOD, "create_time": float("inf")}, "create_time inf is not a time"),
    ({**GOOD, "instance": 7}, "instance and exe should be strings"),
    ({"pid": 5}, "no instance, create_time, exe"),
    ("tiny", "not a mapping"),
]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Callable[[bytes], tuple[ChildRegistry, Path]]]:
    locks: list[StateDirLock] = []

    def make(content: bytes) -> tuple[ChildRegistry, Path]:
        (tmp_path / "state").mkdir(exist_ok=True)
        (tmp_path / "state" / "children.json").write_bytes(content)
        locks.append(StateDirLock.claim(tmp_path / "state", "http://127.0.0.1:1"))
        return ChildRegistry(locks[-1]), tmp_path / "state" / "children.json"

    yield make
    for lock in locks:
        lock.release()


def test_children_json_entries_are_checked_one_by_one(
    registry: Callable[[bytes], tuple[ChildRegistry, Path]], caplog: pytest.LogCaptureFixture
) -> None:
    entries = [entry for entry, _ in BAD_ENTRIES] + [GOOD]
    children, path = registry(json.dumps(entries).encode())
    with caplog.at_level(logging.WARNING, logger="launcher"):
        assert children.clean_leftovers(timeout_s=1) == []  # the good entry's process is long gone
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: entry {i} is skipped, not a server's record: {why}" for i, (_, why) in enumerate(BAD_ENTRIES)
    ]
    assert json.loads(path.read_text()) == []  # written anew: the next start reads no bad entry


@pytest.mark.parametrize(
    ("content", "warning"),
    [
        (b"{}", "{path} is not a list of servers, and is ignored"),
        (
            b"[" * 100_000,
            "{path} cannot be read, and is ignored: "
            "maximum recursion depth exceeded while decoding a JSON array from a unicode string",
        ),
        (
            b"[{",
            "{path} cannot be read, and is ignored: "
            "Expecting property name enclosed in double quotes: line 1 column 3 (char 2)",
        ),
        (
            b"\xff",
            "{path} cannot be read, and is ignored: "
            "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte",
        ),
    ],
)
def test_a_children_json_that_is_no_list_is_ignored(
    content: bytes,
    warning: str,
    registry: Callable[[bytes], tuple[ChildRegistry, Path]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    children, path = registry(content)
    with caplog.at_level(logging.WARNING, logger="launcher"):
        assert children.clean_leftovers(timeout_s=1) == []
    assert [r.getMessage() for r in caplog.records] == [warning.format(path=path)]


def test_a_children_json_that_is_a_fifo_or_huge_is_ignored_unread(
    registry: Callable[[bytes], tuple[ChildRegistry, Path]], caplog: pytest.LogCaptureFixture
) -> None:
    """Read at every daemon start: a FIFO in its place held the start for ever, a huge file was read whole."""
    children, path = registry(b"[]")
    path.unlink()
    with caplog.at_level(logging.WARNING, logger="launcher"):
        assert read_of_a_fifo(path, lambda: children.clean_leftovers(timeout_s=1)) == []
        path.unlink()  # written anew by the clean-up, as a regular file
        with path.open("wb") as huge:
            huge.truncate(64 * 2**20)  # sparse: no disk taken
        tracemalloc.start()
        try:
            assert children.clean_leftovers(timeout_s=1) == []
            peak_b = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak_b < 32 * 2**20, f"{peak_b / 2**20:.0f} MiB held to read it"
    assert [r.getMessage() for r in caplog.records] == [
        f"{path} cannot be read, and is ignored: {path} is not a regular file",
        f"{path} is over 16 MiB, and is ignored",
    ]


def test_a_daemon_with_a_bad_children_json_starts_models(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon], tmp_path: Path
) -> None:
    config = write_config()
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "children.json").write_text(json.dumps([entry for entry, _ in BAD_ENTRIES]))
    daemon = start_daemon(config)
    up = daemon.cli("up", "tiny")
    assert up.returncode == 0, up.stderr
    status = daemon.instance("tiny")
    assert status["state"] == "ready"
    records = json.loads((tmp_path / "state" / "children.json").read_text())
    assert [(r["instance"], r["pid"]) for r in records] == [("tiny", status["pid"])]


# ---- scale -------------------------------------------------------------------------------------------

MANY_MODELS = 20_000  # bench/config_scale.py times it; here it only has to work


def test_twenty_thousand_models_load_and_status_lists_them(
    tmp_path: Path, start_daemon: Callable[[Path], Daemon]
) -> None:
    names = [f"m{i:05d}" for i in range(MANY_MODELS)]
    path = tmp_path / "launcher.yaml"
    models = "".join(f"  {name}: {{model: m.gguf, ctx: 256}}\n" for name in names)
    path.write_text(f"daemon: {{port: {free_port()}, state_dir: state}}\ngpus: {{backend: none}}\nmodels:\n{models}")
    assert list(load_settings(path).models) == names
    daemon = start_daemon(path)
    table = daemon.cli("status")
    assert table.returncode == 0, table.stderr
    rows = [line.split()[:2] for line in table.stdout.splitlines()[1:]]
    assert rows == [[name, "stopped"] for name in names]


# A size the loader took that `launcher serve` then failed on with a traceback (an infinite log size or prompt
# cache budget, a GPU history no deque can hold, a simulated GPU past a float's range) or that stalled the
# event loop at the first log rotation (a billion kept logs, renamed one by one), or that failed every plan of
# the model with one (a memory or context length past a float's range): key -> its YAML.
PAST_FLOATS = "1" + "0" * 400
SIZES_PAST_ANY_USE = {
    "daemon.log_max_mib": "daemon: {log_max_mib: .inf}",
    "daemon.log_max_mib in bytes": "daemon: {log_max_mib: 1e308}",
    "daemon.log_keep": "daemon: {log_keep: 1000000000}",
    "daemon.kv_cache_max_gib": "daemon: {kv_cache_max_gib: 1e308}",
    "models.m.kv_cache_max_gib": "models: {m: {model: m.gguf, kv_cache_max_gib: 1e308}}",
    "gpus.history": "gpus: {history: 10000000000000000000}",
    "gpus.sim.0.memory_mib": "gpus: {sim: [{name: a, memory_mib: " + PAST_FLOATS + "}]}",
    "gpus.overhead_mib": "gpus: {overhead_mib: " + PAST_FLOATS + "}",
    "gpus.margin_mib": "gpus: {margin_mib: " + PAST_FLOATS + "}",
    "gpus.reserve_mib.0": "gpus: {reserve_mib: {0: " + PAST_FLOATS + "}}",
    "models.m.ctx": "models: {m: {model: m.gguf, ctx: " + PAST_FLOATS + "}}",
    "models.m.ctx_max": "models: {m: {model: m.gguf, ctx: max, ctx_max: " + PAST_FLOATS + "}}",
    "models.m.ollama.size_mib": "models: {m: {backend: ollama, model: m, ollama: {size_mib: " + PAST_FLOATS + "}}}",
    # A period the daemon's loops would spin at, holding a core and the event loop.
    "gpus.poll_interval": "gpus: {poll_interval: 1e-300}",
    "models.m.health.interval": "models: {m: {model: m.gguf, health: {interval: 0.001}}}",
    "rpc.peer_interval_s": "rpc: {peer_interval_s: 1e-9}",
}


@pytest.mark.parametrize("key", SIZES_PAST_ANY_USE)
def test_a_size_past_any_use_is_refused_at_load(key: str, tmp_path: Path) -> None:
    path = tmp_path / "launcher.yaml"
    path.write_text(SIZES_PAST_ANY_USE[key] + "\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    [sentence] = str(caught.value).splitlines()
    assert sentence.startswith(f"{path}: {key.split()[0]}: "), sentence


def test_a_daemon_serves_with_the_largest_sizes_taken(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon]
) -> None:
    big = {"name": "big", "memory_mib": MEMORY_MAX_MIB}
    largest = {
        "daemon": {"log_max_mib": LOG_MAX_MIB, "log_keep": LOG_KEEP_MAX, "kv_cache_max_gib": MEMORY_MAX_MIB // 1024},
        "gpus": {"backend": "sim", "history": HISTORY_MAX, "sim": [big], "overhead_mib": MEMORY_MAX_MIB},
    }
    daemon = start_daemon(
        write_config({"tiny": {"ctx": CTX_MAX}, "most": {"ctx": "max", "ctx_max": CTX_MAX}}, **largest)
    )
    assert daemon.http.get("/health").status_code == 200
    [gpu] = daemon.http.get("/gpus").json()
    assert gpu["memory_total_mib"] == MEMORY_MAX_MIB
    for name in ("tiny", "most"):  # planned, fitting or not: no traceback, no 500
        plan = daemon.http.get(f"/plan/{name}")
        assert plan.status_code == 200 and plan.json()["fits"] is False, plan.text
