"""Hub models downloaded into the Hugging Face cache (`launcher pull`, and a start of a model not there yet):
the real `huggingface_hub` client against the stand-in hub on loopback (tests/hubstandin.py), which counts
the bytes it sends, can slow them, drop a connection mid-file, and announce a checksum a file's bytes do
not have. The daemon and the CLI run as the user runs them; `HF_HOME` is the test's own."""

from __future__ import annotations

import errno
import hashlib
import json
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from launcher.config_daemon import DaemonSettings
from launcher.hub.download import PullCancelled, PullProgress, _CheckedFile, pull
from launcher.hub.headers import HubError, HubReader
from launcher.hub.repo import Listing
from launcher.tinymodel import TinyShape, write_tiny_llama
from tests.conftest import ConfigWriter, Daemon, assert_downloading, poll_until, run_cli, stop_process
from tests.hubstandin import Repo, StandInHub, serving

MIB = 1024 * 1024
# A loadable model of about 31 MiB: more than three of the library's 10 MiB download chunks.
MID = TinyShape(n_layer=4, n_embd=512, n_head=8, n_head_kv=4, n_ff=2048)
GATED_TOKEN = "hf_gated_access"


@pytest.fixture(scope="module")
def pull_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Repo]:
    root = tmp_path_factory.mktemp("pull")
    tiny = write_tiny_llama(root / "tiny" / "tiny-F16.gguf")
    mid = write_tiny_llama(root / "mid" / "mid-F16.gguf", MID)
    return {
        "org/tiny-GGUF": Repo({"tiny-F16.gguf": tiny}),
        "org/mid-GGUF": Repo({"mid-F16.gguf": mid}),
        "org/bad-GGUF": Repo({"tiny-F16.gguf": tiny}, wrong_sha256={"tiny-F16.gguf"}),
        # a model and its projector (any GGUF stands for one to the planner and the download)
        "org/vision-GGUF": Repo({"tiny-F16.gguf": tiny, "mmproj-vision-F16.gguf": mid}),
        "org/gated-GGUF": Repo({"tiny-F16.gguf": tiny}, token=GATED_TOKEN),
    }


@pytest.fixture
def hub(pull_files: dict[str, Repo]) -> Iterator[StandInHub]:
    with serving(pull_files) as running:
        yield running


@pytest.fixture
def hub_env(marked_env: dict[str, str], hub: StandInHub, tmp_path: Path) -> dict[str, str]:
    """The environment of the test's daemons and CLIs: the stand-in hub, a Hugging Face home of its own."""
    env = {k: v for k, v in marked_env.items() if not k.startswith("HF_")}
    env.update({"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home")})
    marked_env.clear()
    marked_env.update(env)  # start_daemon's
    return env


def _repo_dir(tmp_path: Path, repo: str) -> Path:
    return tmp_path / "hf-home" / "hub" / f"models--{repo.replace('/', '--')}"


def _partial_bytes(tmp_path: Path, repo: str) -> int:
    return sum(p.stat().st_size for p in (_repo_dir(tmp_path, repo) / "blobs").glob("*.incomplete"))


def _sent(hub: StandInHub, repo: str) -> int:
    return sum(n for key, n in hub.sent_bytes.items() if key.startswith(f"{repo}/"))


def test_pull_without_a_daemon_fetches_the_planned_file_into_the_cache_once(
    hub: StandInHub, hub_env: dict[str, str], write_config: ConfigWriter, tmp_path: Path, pull_files: dict[str, Repo]
) -> None:
    config = write_config({"m": {"model": "hf:org/tiny-GGUF:F16"}})
    result = run_cli("--config", str(config), "pull", "m", env=hub_env)
    assert result.returncode == 0, result.stderr
    repo = pull_files["org/tiny-GGUF"]
    link = _repo_dir(tmp_path, "org/tiny-GGUF") / "snapshots" / repo.commit / "tiny-F16.gguf"
    assert result.stdout.strip() == f"m: in the Hugging Face cache at {link}"
    assert link.is_symlink() and link.read_bytes() == repo.files["tiny-F16.gguf"].read_bytes()
    assert link.resolve().name == hub.sha256(repo.files["tiny-F16.gguf"])  # the library's blob, named by sha256
    assert (_repo_dir(tmp_path, "org/tiny-GGUF") / "refs" / "main").read_text() == repo.commit
    size = repo.files["tiny-F16.gguf"].stat().st_size
    assert size <= hub.total_sent <= size + 64 * 1024  # the file once, and the header its plan read
    sent = hub.total_sent
    again = run_cli("--config", str(config), "pull", "m", env=hub_env)
    assert again.returncode == 0 and hub.total_sent == sent  # in the cache: nothing fetched
    plan = run_cli("--config", str(config), "plan", "m", env=hub_env)
    assert plan.returncode == 0 and f"--model {link}" in plan.stdout  # planned from the file, with its command


def test_a_file_whose_bytes_do_not_match_the_hubs_checksum_is_refused_and_removed(
    hub: StandInHub, hub_env: dict[str, str], write_config: ConfigWriter, tmp_path: Path
) -> None:
    config = write_config({"m": {"model": "hf:org/bad-GGUF:F16"}})
    result = run_cli("--config", str(config), "pull", "m", env=hub_env)
    assert result.returncode == 1 and result.stdout == ""
    said, hint = result.stderr.strip().splitlines()[-2:]  # after the progress lines: a sentence and a hint
    assert said.startswith("launcher: org/bad-GGUF/tiny-F16.gguf does not match the hub's checksum")
    assert hint.startswith("hint: ") and "Traceback" not in result.stderr
    repo_dir = _repo_dir(tmp_path, "org/bad-GGUF")
    assert hub.total_sent > 0 and list((repo_dir / "blobs").iterdir()) == []  # nothing left, whole or partial
    assert not (repo_dir / "snapshots").exists()
    plan = run_cli("--config", str(config), "plan", "m", env=hub_env)
    assert "--model" not in plan.stdout  # never taken for downloaded


# What to do differs: without a token (401), get access and give its token; with a token the hub refuses
# (403), setting HF_TOKEN again changes nothing: that token's account needs access, or another token.
GATED_HINTS = {
    None: "hint: ask for access on its page ({url}/org/gated-GGUF), then set HF_TOKEN or hub.token_file",
    "hf_no_access": "hint: the token given has no access to it: ask for access on its page ({url}/org/gated-GGUF) "
    "with the account the token belongs to, or give the token of an account that has access",
}


@pytest.mark.parametrize("token", [None, "hf_no_access"], ids=["no token (401)", "a token without access (403)"])
def test_a_gated_repo_is_one_sentence_saying_what_to_do_and_leaves_nothing_behind(
    hub: StandInHub, hub_env: dict[str, str], write_config: ConfigWriter, tmp_path: Path, token: str | None
) -> None:
    config = write_config({"m": {"model": "hf:org/gated-GGUF:F16"}})
    result = run_cli("--config", str(config), "pull", "m", env=hub_env | ({"HF_TOKEN": token} if token else {}))
    assert result.returncode == 1 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "launcher: org/gated-GGUF is a gated repo: org/gated-GGUF/tiny-F16.gguf needs access",
        GATED_HINTS[token].format(url=hub.url),
    ]
    assert _sent(hub, "org/gated-GGUF") == 0 and not _repo_dir(tmp_path, "org/gated-GGUF").exists()
    allowed = run_cli("--config", str(config), "pull", "m", env=hub_env | {"HF_TOKEN": GATED_TOKEN})
    assert allowed.returncode == 0, allowed.stderr  # the same pull with access: the refusal was the gate's


@pytest.mark.parametrize("token", [None, "hf_no_access"], ids=["no token (401)", "a token without access (403)"])
def test_a_download_the_gate_refuses_after_its_plan_is_one_sentence_and_writes_nothing(
    hub: StandInHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token: str | None
) -> None:
    """Planned with access (its header read with the token), downloaded without: the access revoked, or the
    token gone, between the two."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    gated = HubReader(tmp_path / "headers", GATED_TOKEN, 16 * MIB, endpoint=hub.url).listing("org/gated-GGUF", None)
    cache = tmp_path / "cache"
    with pytest.raises(HubError) as refused:
        pull(gated.repo, "main", gated.commit, gated.files, cache=cache, token=token, endpoint=hub.url)
    assert refused.value.message == "org/gated-GGUF is a gated repo: org/gated-GGUF/tiny-F16.gguf needs access"
    hint = re.sub(r"\(\S+/org/gated-GGUF\)", "(URL/org/gated-GGUF)", f"hint: {refused.value.hint}")
    assert hint == GATED_HINTS[token].format(url="URL")  # the endpoint: the library's, read at its import
    assert _sent(hub, "org/gated-GGUF") == 0 and not (cache / "models--org--gated-GGUF").exists()


@pytest.fixture
def mid(hub: StandInHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Listing:
    """The 31 MiB model's listing, for pulls in this process (`HF_ENDPOINT` the stand-in's)."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    return HubReader(tmp_path / "headers", None, 16 * MIB, endpoint=hub.url).listing("org/mid-GGUF", None)


def _pull(hub: StandInHub, mid: Listing, cache: Path, **options: Any) -> list[Path]:
    return pull(mid.repo, "main", mid.commit, mid.files, cache=cache, token=None, endpoint=hub.url, **options)


def test_a_disk_without_room_is_refused_before_the_first_byte_with_the_numbers(
    hub: StandInHub, tmp_path: Path, mid: Listing
) -> None:
    files = mid.files
    size = files[0].size_bytes
    with pytest.raises(HubError) as refused:
        _pull(hub, mid, tmp_path / "cache", free_bytes=lambda path: size - 1)
    assert refused.value.message == (
        f"not enough disk space for org/mid-GGUF: {size} bytes still to download, {size - 1} free in "
        f"{tmp_path / 'cache'}"
    )
    assert _sent(hub, "org/mid-GGUF") == 0


def test_a_connection_dropped_mid_file_is_resumed_and_the_file_checked(
    hub: StandInHub, tmp_path: Path, mid: Listing, pull_files: dict[str, Repo]
) -> None:
    hub.drop_after_bytes = 15 * MIB
    seen: list[PullProgress] = []
    paths = _pull(hub, mid, tmp_path / "cache", on_progress=seen.append)
    original = pull_files["org/mid-GGUF"].files["mid-F16.gguf"]
    assert paths[0].read_bytes() == original.read_bytes()
    assert len([r for r in hub.ranges if r is not None and r.startswith("bytes=")]) >= 1  # asked again by range
    assert seen[-1].done_bytes == seen[-1].total_bytes == original.stat().st_size


def test_a_stop_asked_for_mid_download_ends_it_and_keeps_its_partial_file(
    hub: StandInHub, tmp_path: Path, mid: Listing
) -> None:
    files = mid.files
    cancelled = threading.Event()

    def stop_after_a_chunk(progress: PullProgress) -> None:
        if progress.done_bytes >= 10 * MIB:
            cancelled.set()

    with pytest.raises(PullCancelled):
        _pull(hub, mid, tmp_path / "cache", on_progress=stop_after_a_chunk, cancelled=cancelled)
    partial = list((tmp_path / "cache" / "models--org--mid-GGUF" / "blobs").glob("*.incomplete"))
    held = partial[0].stat().st_size
    assert 10 * MIB <= held < files[0].size_bytes
    gets = len(hub.get_keys)
    paths = _pull(hub, mid, tmp_path / "cache")
    assert hub.sent_since(gets) == files[0].size_bytes - held  # the remainder alone
    assert paths[0].stat().st_size == files[0].size_bytes and not partial[0].exists()


def test_a_download_killed_with_the_daemon_resumes_at_the_next_start_and_shows_its_progress(
    hub: StandInHub,
    hub_env: dict[str, str],
    write_config: ConfigWriter,
    start_daemon: Callable[[Path], Daemon],
    tmp_path: Path,
    pull_files: dict[str, Repo],
) -> None:
    config = write_config({"m": {"model": "hf:org/mid-GGUF:F16"}})
    size = pull_files["org/mid-GGUF"].files["mid-F16.gguf"].stat().st_size
    hub.rate_bytes_s = 8 * MIB
    daemon = start_daemon(config)
    started = daemon.http.post("/instances/m/start")
    assert started.status_code == 202 and started.json()["state"] == "downloading", started.text
    status = daemon.wait_for("m", lambda s: (s["download"] or {}).get("done_bytes", 0) >= 10 * MIB)
    assert status["state"] == "downloading" and status["download"]["total_bytes"] == size
    assert status["download"]["rate_bytes_s"] > 0 and status["download"]["eta_s"] is not None
    assert any(e["kind"] == "download" and f" of {size / 1e6:.2f} MB (" in e["message"] for e in status["events"])
    shown = daemon.cli("status")
    assert re.search(rf"\nm: downloading: [\d.]+ of {size / 1e6:.2f} MB \(\d+ %\), [\d.]+ MB/s", shown.stdout)
    daemon.stop(signal.SIGKILL)
    partial = _partial_bytes(tmp_path, "org/mid-GGUF")
    assert 10 * MIB <= partial < size
    hub.rate_bytes_s = None
    gets = len(hub.get_keys)
    again = start_daemon(config)
    assert again.http.post("/instances/m/start").json()["state"] == "downloading"
    ready = again.wait_for("m", lambda s: s["state"] in ("ready", "failed"))
    assert ready["state"] == "ready", ready["last_error"]
    assert hub.sent_since(gets, "org/mid-GGUF/") == size - partial  # the remainder, not the file again


def test_an_on_demand_model_downloading_answers_503_with_its_progress_then_serves(
    hub: StandInHub,
    hub_env: dict[str, str],
    write_config: ConfigWriter,
    start_daemon: Callable[[Path], Daemon],
) -> None:
    config = write_config({"m": {"model": "hf:org/tiny-GGUF:F16", "on_demand": True}})
    hub.rate_bytes_s = 256 * 1024  # about 1.5 s for its 372 KB
    daemon = start_daemon(config)
    body = {"model": "m", "prompt": "Hello", "max_tokens": 4}
    assert_downloading(daemon.http.post("/v1/completions", json=body), "m")
    ready = daemon.wait_for("m", lambda s: s["state"] in ("ready", "failed"))
    assert ready["state"] == "ready", ready["last_error"]
    served = daemon.http.post("/v1/completions", json=body)
    assert served.status_code == 200 and served.json()["choices"][0]["text"] is not None


def test_offline_mode_starts_a_pulled_model_from_the_cache_alone(
    hub: StandInHub,
    hub_env: dict[str, str],
    write_config: ConfigWriter,
    start_daemon: Callable[[Path], Daemon],
    marked_env: dict[str, str],
) -> None:
    config = write_config({"m": {"model": "hf:org/tiny-GGUF:F16"}, "n": {"model": "hf:org/mid-GGUF:F16"}})
    assert run_cli("--config", str(config), "pull", "m", env=hub_env).returncode == 0
    asked = len(hub.requests)
    marked_env["HF_HUB_OFFLINE"] = "1"
    daemon = start_daemon(config)
    assert daemon.http.post("/instances/m/start").status_code == 202
    assert daemon.wait_for("m", lambda s: s["state"] in ("ready", "failed"))["state"] == "ready"
    refused = daemon.http.post("/instances/n/start")
    assert refused.status_code == 503 and refused.json()["detail"].startswith("HF_HUB_OFFLINE is set"), refused.text
    assert len(hub.requests) == asked  # the hub was not asked


def test_stopping_a_download_through_the_daemon_keeps_its_partial_file(
    hub: StandInHub,
    hub_env: dict[str, str],
    write_config: ConfigWriter,
    start_daemon: Callable[[Path], Daemon],
    tmp_path: Path,
) -> None:
    config = write_config({"m": {"model": "hf:org/mid-GGUF:F16"}})
    hub.rate_bytes_s = 8 * MIB
    daemon = start_daemon(config)
    daemon.http.post("/instances/m/start")
    daemon.wait_for("m", lambda s: (s["download"] or {}).get("done_bytes", 0) >= 10 * MIB)
    stopped = daemon.http.post("/instances/m/stop")
    assert stopped.status_code == 202 and stopped.json()["state"] == "stopped", stopped.text
    poll_until(lambda: _partial_bytes(tmp_path, "org/mid-GGUF"), lambda n: n >= 10 * MIB, "partial file", 10)
    events = [e["message"] for e in daemon.instance("m")["events"]]
    assert any("download stopped" in m for m in events)
    assert list(_repo_dir(tmp_path, "org/mid-GGUF").rglob("*.gguf")) == []  # never half-written in a snapshot
    daemon.http.post("/instances/m/start")  # resumed, then the daemon's own stop ends it too
    daemon.wait_for("m", lambda s: (s["download"] or {}).get("done_bytes", 0) >= 20 * MIB)
    assert daemon.stop() == 0
    assert _partial_bytes(tmp_path, "org/mid-GGUF") >= 20 * MIB  # ended, not finished on the way out
    assert list(_repo_dir(tmp_path, "org/mid-GGUF").rglob("*.gguf")) == []


def test_an_ad_hoc_hub_model_runs_under_a_name_derived_from_its_repo_and_answers(
    hub: StandInHub, hub_env: dict[str, str], write_config: ConfigWriter
) -> None:
    config = write_config()  # no entry for it
    daemon_url = DaemonSettings(port=yaml.safe_load(config.read_text())["daemon"]["port"]).client_url
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "--config", str(config), "up", "hf:org/tiny-GGUF:F16"],
        env=hub_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None and proc.stdout is not None
        assert proc.stderr.readline().strip() == "hf:org/tiny-GGUF:F16 runs as 'tiny-f16'"
        assert proc.stdout.readline().startswith("tiny-f16 is ready at http://127.0.0.1:")
        body = {"model": "tiny-f16", "prompt": "Hello", "max_tokens": 4}
        answer = httpx.post(f"{daemon_url}/v1/completions", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
    finally:
        assert stop_process(proc) == 0


def test_an_ad_hoc_hub_model_is_refused_in_one_sentence_while_a_daemon_serves_its_file(
    hub: StandInHub, hub_env: dict[str, str], write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon]
) -> None:
    daemon = start_daemon(write_config())
    result = daemon.cli("up", "hf:org/tiny-GGUF:F16")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("launcher: hf:org/tiny-GGUF:F16 is not in the configuration, and a daemon runs")
    assert hub.requests == []


def test_a_disk_that_fills_mid_download_leaves_a_partial_file_the_next_pull_resumes(
    hub: StandInHub, tmp_path: Path, mid: Listing, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = mid.files
    put = _CheckedFile._put
    room = {"bytes": 15 * MIB}  # the disk takes this much more, then is full

    def onto_a_small_disk(self: _CheckedFile, chunk: bytes) -> None:
        if len(chunk) > room["bytes"]:
            put(self, chunk[: room["bytes"]])
            room["bytes"] = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        room["bytes"] -= len(chunk)
        put(self, chunk)

    monkeypatch.setattr(_CheckedFile, "_put", onto_a_small_disk)
    cache = tmp_path / "cache"
    with pytest.raises(HubError) as full:
        _pull(hub, mid, cache)
    assert full.value.message.startswith(f"the disk filled while downloading org/mid-GGUF/mid-F16.gguf: {15 * MIB} of")
    blobs = cache / "models--org--mid-GGUF" / "blobs"
    assert [p.suffix for p in blobs.iterdir()] == [".incomplete"]  # nothing whole-looking, nothing linked
    monkeypatch.setattr(_CheckedFile, "_put", put)  # room again
    gets = len(hub.get_keys)
    paths = _pull(hub, mid, cache)
    assert hub.sent_since(gets) == files[0].size_bytes - 15 * MIB
    assert hashlib.sha256(paths[0].read_bytes()).hexdigest() == paths[0].resolve().name


def _projector_mib(plan: object) -> int:
    """The projector's MiB wherever the plan puts it (a GPU, or the host)."""
    if isinstance(plan, dict):
        return int(plan.get("projector_mib") or 0) + sum(_projector_mib(v) for v in plan.values())
    if isinstance(plan, list):
        return sum(_projector_mib(v) for v in plan)
    return 0


def test_a_hub_projector_is_planned_from_its_header_pulled_with_the_model_and_passed_as_mmproj(
    hub: StandInHub, hub_env: dict[str, str], write_config: ConfigWriter, tmp_path: Path, pull_files: dict[str, Repo]
) -> None:
    projector = "hf:org/vision-GGUF/mmproj-vision-F16.gguf"
    config = write_config({"m": {"model": "hf:org/vision-GGUF:F16", "mmproj": projector}})
    before = run_cli("--config", str(config), "--json", "plan", "m", env=hub_env)
    assert before.returncode == 0, before.stderr
    planned = json.loads(before.stdout)
    assert planned["command"] == [] and _projector_mib(planned) >= 29  # its 31 MiB of weights, before a byte
    assert _sent(hub, "org/vision-GGUF") == 2 * 64 * 1024  # the first range of each header, no more
    result = run_cli("--config", str(config), "pull", "m", env=hub_env)
    assert result.returncode == 0, result.stderr
    # one progress over both files: the total the model's and the projector's, what is done never going back
    shown = [re.search(r": ([\d.]+) of ([\d.]+) MB", line) for line in result.stderr.splitlines()]
    readings = [(float(m[1]), float(m[2])) for m in shown if m is not None]
    assert len({total for _, total in readings}) == 1 and readings[-1][0] == readings[-1][1] >= 31, readings
    assert [done for done, _ in readings] == sorted(done for done, _ in readings)
    snapshot = _repo_dir(tmp_path, "org/vision-GGUF") / "snapshots" / pull_files["org/vision-GGUF"].commit
    assert sorted(p.name for p in snapshot.iterdir()) == ["mmproj-vision-F16.gguf", "tiny-F16.gguf"]
    after = run_cli("--config", str(config), "plan", "m", env=hub_env)
    assert after.returncode == 0 and f"--mmproj {snapshot / 'mmproj-vision-F16.gguf'}" in after.stdout


@pytest.mark.parametrize(
    ("entry", "said"),
    [
        ({"model": "hf:org/vision-GGUF:F16", "mmproj": "hf:org/vision-GGUF"}, "name the projector's file"),
        ({"mmproj": "hf:org/vision-GGUF/mmproj-vision-F16.gguf"}, "goes with a model on the hub"),
        ({"model": "hf:org/vision-GGUF:F16", "mmproj": "/p.gguf", "args": ["--mmproj", "/p.gguf"]}, "name it once"),
    ],
)
def test_a_projector_named_wrongly_is_one_sentence_at_load(
    entry: dict[str, object], said: str, write_config: ConfigWriter, marked_env: dict[str, str]
) -> None:
    result = run_cli("--config", str(write_config({"m": entry})), "plan", "m", env=marked_env)
    assert result.returncode == 2 and said in result.stderr and "Traceback" not in result.stderr


def test_a_cache_that_cannot_be_written_is_one_sentence(
    hub: StandInHub, hub_env: dict[str, str], write_config: ConfigWriter, tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    env = {**hub_env, "HF_HUB_CACHE": str(tmp_path / "a-file" / "hub")}
    result = run_cli("--config", str(write_config({"m": {"model": "hf:org/tiny-GGUF:F16"}})), "pull", "m", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    said, hint = result.stderr.strip().splitlines()[-2:]
    assert said.startswith("launcher: the Hugging Face cache") and "a-file" in said and hint.startswith("hint: ")


@pytest.mark.parametrize("extra", [0, 100], ids=["whole", "longer"])
def test_a_partial_file_already_whole_or_longer_is_checked_not_asked_for_beyond_its_end(
    hub: StandInHub, tmp_path: Path, mid: Listing, pull_files: dict[str, Repo], extra: int
) -> None:
    """A pull killed after its last byte but before the rename leaves the whole file as `.incomplete` (and a
    foreign tool may leave a longer one): the next pull must not ask for the bytes past its end forever."""
    original = pull_files["org/mid-GGUF"].files["mid-F16.gguf"]
    blobs = tmp_path / "cache" / "models--org--mid-GGUF" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{hub.sha256(original)}.incomplete").write_bytes(original.read_bytes() + b"\0" * extra)
    seen: list[PullProgress] = []
    paths = _pull(hub, mid, tmp_path / "cache", on_progress=seen.append)
    assert paths[0].read_bytes() == original.read_bytes()
    assert all(p.done_bytes <= p.total_bytes for p in seen) and seen[-1].done_bytes == seen[-1].total_bytes


def test_a_restart_of_a_hub_model_not_downloaded_downloads_it_then_serves(
    hub: StandInHub,
    hub_env: dict[str, str],
    write_config: ConfigWriter,
    start_daemon: Callable[[Path], Daemon],
) -> None:
    daemon = start_daemon(write_config({"m": {"model": "hf:org/tiny-GGUF:F16"}}))
    restarted = daemon.http.post("/instances/m/restart")
    assert restarted.status_code == 202 and restarted.json()["state"] == "downloading", restarted.text
    ready = daemon.wait_for("m", lambda s: s["state"] in ("ready", "failed"))
    assert ready["state"] == "ready", ready["last_error"]
