"""Configuration: the shipped examples load; bad files are rejected with file, key and expectation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.config_file import load_settings, parse_settings
from launcher.config_yaml import read_config_text
from launcher.errors import ConfigError, NotFoundError
from launcher.server_args import INT_MAX

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_there_are_examples() -> None:
    names = {p.stem for p in CONFIGS}
    expected = {
        "demo",
        "qwen72b-2x7900xtx",
        "llama3-70b-2x3090",
        "mixed-24-16",
        "two-models-two-gpus",
        "ollama-per-gpu",
    }
    assert expected <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_examples_load(path: Path) -> None:
    settings = load_settings(path)
    assert settings.models
    for model in settings.models.values():
        assert isinstance(model.model, Path)
        assert model.model.is_absolute() == (model.backend == "llama-server")  # an Ollama model is a name


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("models: {m: {model: a.gguf, colour: red}}", "models.m.colour: unknown key"),
        ("daemon: {port: 0}", "daemon.port: should be greater than or equal to 1 (got 0)"),
        ("models: {m: {model: a.gguf, port: 99999}}", "models.m.port: should be 'auto' or less than or equal"),
        ("models: {m: {model: a.gguf, tensor_split: [1, -1]}}", "models.m.tensor_split.1: should be greater"),
        ("models: {m: {model: a.gguf, tensor_split: [0, 0]}}", "needs at least one positive proportion"),
        ("models: {m: {model: a.gguf, gpus: [0], tensor_split: [1, 1]}}", "tensor_split has 2 entries but gpus"),
        ("models: {m: {model: a.gguf, ctx: lots}}", "models.m.ctx: should be a valid integer"),
        ("models: {m: {ctx: 10}}", "models.m.model: Field required"),
        ("models: {m: {model: a.gguf, restart: {policy: sometimes}}}", "models.m.restart.policy: should be"),
        ("models: {'bad name': {model: a.gguf}}", "does not follow the rule for names"),
        ("gpus: {backend: cuda}", "gpus.backend: should be 'auto', 'nvml'"),
        ("models: {m: {model: a.gguf, drain_timeout_s: .inf}}", "drain_timeout_s: should be a finite number"),
        ("gpus: {poll_interval: .nan}", "gpus.poll_interval: should be a finite number"),
        # the bound (1 + ε) x the mean is made a whole number: an infinite one raised in each request's choice
        ("models: {m: {model: a.gguf, routing_epsilon: .inf}}", "models.m.routing_epsilon: should be a finite"),
        ("models: {m: {model: a.gguf, routing_epsilon: 1e308}}", "routing_epsilon: should be less than or equal"),
        # a pinned model the idle timer stopped surprised its user: the two are refused together
        ("models: {m: {model: a.gguf, pinned: true, idle_ttl_s: 60}}", "models.m: pinned and idle_ttl_s: a pinned"),
        ("- a list", "expected a mapping"),
    ],
)
def test_rejections_name_file_and_key(text: str, expected: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    with pytest.raises(ConfigError) as caught:
        parse_settings(text, path)
    assert str(path) in str(caught.value)
    assert expected in str(caught.value)


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "launcher.yaml"
    path.write_text("daemon: {port: 9000, host: 127.0.0.2}\n")
    monkeypatch.setenv("LAUNCHER_DAEMON__PORT", "9100")
    settings = load_settings(path)
    assert (settings.daemon.host, settings.daemon.port) == ("127.0.0.2", 9100)


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    settings = parse_settings("daemon: {state_dir: st}\nmodels: {m: {model: ../m.gguf}}", tmp_path / "c" / "l.yaml")
    assert settings.models["m"].model == tmp_path / "m.gguf"  # normalised: no ".." shown
    assert settings.daemon.state_dir == tmp_path / "c" / "st"


def test_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LAUNCHER_CONFIG", raising=False)
    home = tmp_path / "home/.config/launcher/launcher.yaml"
    home.parent.mkdir(parents=True)
    home.write_text("daemon: {port: 1001}\n")
    assert load_settings().daemon.port == 1001
    (tmp_path / "launcher.yaml").write_text("daemon: {port: 1002}\n")
    assert load_settings().daemon.port == 1002
    (tmp_path / "env.yaml").write_text("daemon: {port: 1003}\n")
    monkeypatch.setenv("LAUNCHER_CONFIG", str(tmp_path / "env.yaml"))
    assert load_settings().daemon.port == 1003
    (tmp_path / "flag.yaml").write_text("daemon: {port: 1004}\n")
    assert load_settings(tmp_path / "flag.yaml").daemon.port == 1004


def test_unknown_model_lists_the_known_ones(tmp_path: Path) -> None:
    settings = parse_settings("models: {a: {model: a.gguf}, b: {model: b.gguf}}", tmp_path / "l.yaml")
    with pytest.raises(NotFoundError, match="configured models: a, b"):
        settings.model("c")


# ---- pass-through args: what the planner and doctor read is checked at load --------------------------

KV_TYPES = "f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, iq4_nl"
SPLIT = "non-negative numbers separated by commas or slashes, at least one of them positive"


def load_args(args: list[str], path: Path) -> list[str]:
    text = f"models: {{tiny: {{model: a.gguf, args: {json.dumps(args)}}}}}"
    return parse_settings(text, path).models["tiny"].args


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-c", "lots"], f"-c needs a whole number up to {INT_MAX}"),
        (["--ctx-size=-1"], f"--ctx-size needs a whole number up to {INT_MAX}"),
        (["-c", str(INT_MAX + 1)], f"-c needs a whole number up to {INT_MAX}"),  # past llama.cpp's std::stoi
        (["-ctk", "q4_K"], f"-ctk needs a KV cache type ({KV_TYPES})"),
        (["--cache-type-v", "F16"], f"--cache-type-v needs a KV cache type ({KV_TYPES})"),
        (["-fa", "yes"], "-fa needs on, off or auto"),
        (["-ub", "abc"], f"-ub needs a positive whole number up to {INT_MAX}"),
        (["--ubatch-size", "0"], f"--ubatch-size needs a positive whole number up to {INT_MAX}"),
        (["-b", "1.5"], f"-b needs a positive whole number up to {INT_MAX}"),
        (["-np", "0"], f"-np needs a positive whole number up to {INT_MAX} or -1 (auto)"),
        (["--parallel", "-2"], f"--parallel needs a positive whole number up to {INT_MAX} or -1 (auto)"),
        (["-ngl", "most"], f"-ngl needs a whole number up to {INT_MAX}, auto or all"),
        (["--gpu-layers=-1"], f"--gpu-layers needs a whole number up to {INT_MAX}, auto or all"),
        (["-ngl", str(INT_MAX + 1)], f"-ngl needs a whole number up to {INT_MAX}, auto or all"),
        (["-ts", "3,x"], f"-ts needs {SPLIT}"),
        (["-ts", "0/0"], f"-ts needs {SPLIT}"),
        (["-ts", "1,-1"], f"-ts needs {SPLIT}"),
        (["-ub", "512", "-c"], "-c needs a value"),
        (
            ["-ub", "abc", "-ub", "512"],
            f"-ub needs a positive whole number up to {INT_MAX}",
        ),  # llama-server parses every one
        (["-fa", "-c", "4096"], "-fa needs on, off or auto"),  # a bare -fa takes the next word as its value
    ],
)
def test_args_the_planner_reads_are_checked_at_load(args: list[str], message: str, tmp_path: Path) -> None:
    path = tmp_path / "launcher.yaml"
    with pytest.raises(ConfigError) as caught:
        load_args(args, path)
    assert str(caught.value) == f"{path}: models.tiny.args: {message} (got {_first_value(args, message)})"


@pytest.mark.parametrize("flag", ["-c", "-b", "-ngl"])
def test_a_number_in_args_past_a_floats_range_is_refused(flag: str, tmp_path: Path) -> None:
    """Taken before: every plan of the model failed with an OverflowError traceback (for -c), or the check
    itself raised past Python's 4300 digits."""
    path = tmp_path / "launcher.yaml"
    for digits in (400, 5000):
        with pytest.raises(ConfigError) as caught:
            load_args([flag, "9" * digits], path)
        [sentence] = str(caught.value).splitlines()
        assert sentence.startswith(f"{path}: models.tiny.args: {flag} needs a "), sentence
        assert f"whole number up to {INT_MAX}" in sentence, sentence


def _first_value(args: list[str], message: str) -> str:
    """What the error says it got: the first value of the flag it names, or that nothing followed it."""
    flag = message.split()[0]
    for i, arg in enumerate(args):
        name, eq, inline = arg.partition("=")
        if name == flag:
            return repr(inline) if eq else repr(args[i + 1]) if i + 1 < len(args) else "nothing after it"
    raise AssertionError(f"{flag} is not in {args}")


def test_args_llama_server_takes_load_in_both_forms(tmp_path: Path) -> None:
    args = [
        *("-c", "0", "--ctx-size=8192", "-ctk", "q8_0", "--cache-type-v=iq4_nl", "-ctv", "bf16"),
        *("-fa", "auto", "--flash-attn=enabled", "-fa", "0", "-ub", "256", "--batch-size=1024"),
        *("-np", "-1", "--parallel", "2", "-ngl", "all", "--n-gpu-layers=auto", "--gpu-layers", "99"),
        *("-ts", "3,1", "--tensor-split=0/1.5", "-ts", "1e1,,.5"),
        *("--jinja", "--alias", "x", "-cb"),  # flags the launcher does not read pass as they are
    ]
    assert load_args(args, tmp_path / "launcher.yaml") == args


def test_numbers_in_args_are_the_words_that_spell_them(tmp_path: Path) -> None:
    path = tmp_path / "l.yaml"
    settings = parse_settings('models: {tiny: {model: m.gguf, args: [-c, 4096, -fa, "on", --temp, 0.7]}}', path)
    assert settings.models["tiny"].args == ["-c", "4096", "-fa", "on", "--temp", "0.7"]
    with pytest.raises(ConfigError) as caught:
        parse_settings("models: {tiny: {model: m.gguf, args: [-fa, on]}}", path)
    assert str(caught.value) == (
        f"{path}: models.tiny.args: YAML reads an unquoted on, off, yes or no as true/false: quote it, "
        "as in [-fa, \"on\"] (got ['-fa', True])"
    )


# ---- pass-through args: what the planner and doctor read is checked at load --------------------------

KV_TYPES = "f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, iq4_nl"
SPLIT = "non-negative numbers separated by commas or slashes, at least one of them positive"


def test_environment_overrides_the_file_and_names_itself_in_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAUNCHER_DAEMON__PORT", "9100")
    monkeypatch.setenv("LAUNCHER_DAEMON__INSTANCE_PORTS", "[9110, 9119]")
    monkeypatch.setenv("LAUNCHER_GPUS__MARGIN_MIB", "0")
    monkeypatch.setenv("LAUNCHER_TEST_ONLY", "ignored: not a section")
    settings = parse_settings("daemon: {port: 8400}", tmp_path / "l.yaml")
    assert (settings.daemon.port, settings.daemon.instance_ports, settings.gpus.margin_mib) == (9100, (9110, 9119), 0)
    monkeypatch.setenv("LAUNCHER_DAEMON__PROT", "1")
    with pytest.raises(ConfigError) as caught:
        parse_settings("", tmp_path / "l.yaml")
    assert str(caught.value) == f"{tmp_path / 'l.yaml'}: daemon.prot (from LAUNCHER_DAEMON__PROT): unknown key"


def test_environment_value_that_is_not_json_names_its_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAUNCHER_DAEMON__PORT", "9100")
    monkeypatch.setenv("LAUNCHER_DAEMON__INSTANCE_PORTS", "[9110,")
    with pytest.raises(ConfigError) as caught:
        parse_settings("", tmp_path / "l.yaml")
    assert str(caught.value) == "environment LAUNCHER_DAEMON__INSTANCE_PORTS: not valid JSON: '[9110,'"
    monkeypatch.setenv("LAUNCHER_DAEMON__INSTANCE_PORTS", "[" * 100_000)  # past the recursion limit
    with pytest.raises(ConfigError) as caught:
        parse_settings("", tmp_path / "l.yaml")
    assert str(caught.value) == f"environment LAUNCHER_DAEMON__INSTANCE_PORTS: not valid JSON: '{'[' * 79}…'"


def test_environment_nests_deeper_than_a_section_and_keeps_the_file_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAUNCHER_GPUS__MARGIN_MIB", "128")
    settings = parse_settings("gpus: {margin_mib: 512}\ndaemon: {port: 8500}", tmp_path / "l.yaml")
    assert (settings.gpus.margin_mib, settings.daemon.port) == (128, 8500)


# What a configuration load imports, in a fresh interpreter: pydantic-settings only when a variable is set.
_LOADS = (
    "import sys; from launcher.config_file import parse_settings; from pathlib import Path; "
    "s = parse_settings('', Path('l.yaml')); print(s.daemon.port, 'pydantic_settings' in sys.modules)"
)


@pytest.mark.parametrize(
    ("variables", "expected"),
    [({}, "8400 False"), ({"LAUNCHER_DAEMON__PORT": "9100", "LAUNCHER_TEST_ONLY": "x"}, "9100 True")],
    ids=["plain", "with-a-variable"],
)
def test_pydantic_settings_is_imported_only_when_a_settings_variable_is_set(
    variables: dict[str, str], expected: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAUNCHER_DAEMON", "LAUNCHER_GPUS"))}
    done = subprocess.run(
        [sys.executable, "-c", _LOADS], env=env | variables, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == expected.split()


def test_a_fifo_in_place_of_the_file_is_refused_without_blocking(tmp_path: Path) -> None:
    """Read as a reload reads it, even after a check by name: a FIFO swapped in would hold the reader (and,
    for the watcher, the daemon) forever; it is refused at once."""
    fifo = tmp_path / "launcher.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match=r"launcher\.yaml is not a regular file"):
        read_config_text(fifo)
