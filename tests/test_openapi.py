"""The OpenAPI document is the truth: schemathesis, run over /openapi.json of a real daemon in all its
phases (examples, coverage, fuzzing, stateful) with every check, finds no response the document does not
declare, with the API token and without it; and the daemon's instance is untouched afterwards.

Pins in schemathesis' configuration, each for a reason: a followed log or GPU sample stream never ends
(the fuzzer would wait on it until its timeout, or forever where samples keep coming), so those operations
are fuzzed with `follow=false` (following is tested in test_daemon.py and, for the samples, test_ui.py);
`/daemon/upgrade` is not fuzzed: during an upgrade the bridge (launcher/bridge.py) answers the API's
operations with 503 and Retry-After by design, which the other run would count as server errors (that an
upgrade cuts no answer under way is tested in test_upgrade_answers.py; this fuzz, run with the upgrade
before the bridge existed, found none cut); and the acts (start, stop, restart) are fuzzed with the token
on a name that is no instance, since stopping the canary with a valid token is the API doing its job.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
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

[[operations]]
include-path = "/daemon/upgrade"
enabled = false
"""
CANARY = "fuzz-canary"
GPUS = {"backend": "sim", "sim": [{"name": "Sim A", "memory_mib": 24576}, {"name": "Sim B", "memory_mib": 16384}]}


def schemathesis(
    daemon: Daemon,
    workdir: Path,
    headers: Sequence[str] = (),
    *,
    phases: str = "examples,coverage,fuzzing,stateful",
    checks: str = "all",
    max_examples: int = 10,
    report: Path | None = None,
) -> subprocess.Popen[str]:
    """A run over the daemon's document, each request with ``headers`` ("Name: value"); with ``report``, a
    HAR file there of every request and answer. The document is read first and handed over as a file: a
    hostile Host in ``headers`` would have it refused."""
    workdir.mkdir()
    (workdir / "schemathesis.toml").write_text(SCHEMATHESIS_CONFIG)
    (workdir / "openapi.json").write_text(daemon.http.get("/openapi.json").text)
    argv = [
        str(Path(sys.executable).parent / "st"),
        "--config-file",
        "schemathesis.toml",
        "run",
        "openapi.json",
        "--url",
        daemon.url,
        "--phases",
        phases,
        "--checks",
        checks,
        "--max-examples",
        str(max_examples),
        "--request-timeout",
        "10",
        "--seed",
        "1",
        *(option for header in headers for option in ("--header", header)),
        *(["--report", "har", "--report-har-path", str(report)] if report is not None else []),
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
        "with the token": schemathesis(daemon, tmp_path / "with-token", [f"Authorization: Bearer {token}"]),
        "without it": schemathesis(daemon, tmp_path / "without-token"),
    }
    outputs = {name: run.communicate(timeout=280)[0] for name, run in runs.items()}
    for name, run in runs.items():
        assert run.returncode == 0, f"schemathesis {name}:\n{outputs[name][-6000:]}"
        [(generated, passed)] = re.findall(r"(\d+) generated, (\d+) passed", outputs[name])
        assert int(generated) == int(passed) > 100, f"schemathesis {name}: {generated} cases, {passed} passed"
    after = daemon.instance(CANARY)
    assert (after["pid"], after["state"], after["restarts"]) == (before["pid"], "ready", before["restarts"])


# A rebinding page's Host, and a page of another origin (a browser sends both headers): every answer is the
# refusal, declared in the document, in ErrorBody's shape; never a 500, never an act.
HOSTILE = {
    "hostile Host": (["Host: evil.example:8400"], 421),
    "hostile Origin": (["Origin: http://evil.example", "Sec-Fetch-Site: cross-site"], 403),
}
# What an answer that is all refusals can be checked against (the others expect acceptance or a 405).
CONFORMANCE = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def test_schemathesis_with_a_hostile_host_or_origin_meets_only_refusals(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon], standin: Path, tmp_path: Path
) -> None:
    daemon = start_daemon(write_config({CANARY: {"autostart": True, "binary": str(standin)}}, gpus=GPUS))
    before = daemon.wait_for(CANARY, lambda s: s["state"] == "ready")
    runs = {
        name: schemathesis(
            daemon,
            tmp_path / name.replace(" ", "-"),
            headers,
            phases="examples,coverage,fuzzing",
            checks=CONFORMANCE,
            max_examples=5,
            report=tmp_path / f"{name.replace(' ', '-')}.har",
        )
        for name, (headers, _status) in HOSTILE.items()
    }
    outputs = {name: run.communicate(timeout=280)[0] for name, run in runs.items()}
    for name, (_headers, status) in HOSTILE.items():
        assert runs[name].returncode == 0, f"schemathesis, {name}:\n{outputs[name][-6000:]}"
        entries = json.loads((tmp_path / f"{name.replace(' ', '-')}.har").read_text())["log"]["entries"]
        assert len(entries) > 100, f"{name}: {len(entries)} requests"
        answers = {(e["response"]["status"], e["response"]["content"].get("text", "")) for e in entries}
        assert {answer_status for answer_status, _text in answers} == {status}, name
        for _status, text in answers:
            if text:  # a HEAD's answer has no body
                body = json.loads(text)
                assert set(body) == {"detail", "hint"} and body["hint"], (name, body)
    after = daemon.instance(CANARY)
    assert (after["pid"], after["state"], after["restarts"]) == (before["pid"], "ready", before["restarts"])
