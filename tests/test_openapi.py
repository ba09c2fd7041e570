"""The OpenAPI document is the truth: schemathesis, run over /openapi.json of a real daemon in all its
phases (examples, coverage, fuzzing, stateful) with every check, finds no response the document does not
declare, with the API token and without it; and the daemon's instance is untouched afterwards.

Pins in schemathesis' configuration, each for a reason: a followed log or GPU sample stream never ends
(the fuzzer would wait on it until its timeout, or forever where samples keep coming), so those operations
are fuzzed with `follow=false` (following is tested in test_daemon.py and, for the samples, test_ui.py);
and the acts (start, stop, restart) are fuzzed with the token on a name that is no instance, since
stopping the canary with a valid token is the API doing its job.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.conftest import ConfigWriter, Daemon, write_secret

SCHEMATHESIS_CONFIG = """
[[operations]]
include-path = "/instances/{name}/logs"
parameters = { "follow" = false }

[[operations]]
include-path = "/gpus/stream"
parameters = { "follow" = false }

[[operations]]
include-method = "POST"
parameters = { "name" = "no-such-instance" }
"""
CANARY = "fuzz-canary"
GPUS = {"backend": "sim", "sim": [{"name": "Sim A", "memory_mib": 24576}, {"name": "Sim B", "memory_mib": 16384}]}


def schemathesis(daemon: Daemon, workdir: Path, token: str | None) -> subprocess.Popen[str]:
    workdir.mkdir()
    (workdir / "schemathesis.toml").write_text(SCHEMATHESIS_CONFIG)
    argv = [
        str(Path(sys.executable).parent / "st"),
        "--config-file",
        "schemathesis.toml",
        "run",
        f"{daemon.url}/openapi.json",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--checks",
        "all",
        "--max-examples",
        "10",
        "--request-timeout",
        "10",
        "--seed",
        "1",
        *(["--header", f"Authorization: Bearer {token}"] if token else []),
    ]
    # Its working directory holds what it writes (.hypothesis, .schemathesis): inside the test's tmp dir.
    return subprocess.Popen(argv, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_schemathesis_finds_nothing_and_touches_no_instance(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon], tmp_path: Path
) -> None:
    token = "fuzz-token-1234"
    write_secret(tmp_path / "token", token)
    config = write_config({CANARY: {"autostart": True}}, gpus=GPUS, daemon={"token_file": str(tmp_path / "token")})
    daemon = start_daemon(config)
    before = daemon.wait_for(CANARY, lambda s: s["state"] == "ready")
    runs = {
        "with the token": schemathesis(daemon, tmp_path / "with-token", token),
        "without it": schemathesis(daemon, tmp_path / "without-token", None),
    }
    outputs = {name: run.communicate(timeout=280)[0] for name, run in runs.items()}
    for name, run in runs.items():
        assert run.returncode == 0, f"schemathesis {name}:\n{outputs[name][-6000:]}"
        [(generated, passed)] = re.findall(r"(\d+) generated, (\d+) passed", outputs[name])
        assert int(generated) == int(passed) > 100, f"schemathesis {name}: {generated} cases, {passed} passed"
    after = daemon.instance(CANARY)
    assert (after["pid"], after["state"], after["restarts"]) == (before["pid"], "ready", before["restarts"])
