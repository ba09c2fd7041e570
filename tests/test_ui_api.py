"""The dashboard's part of the API, in process: the page's files (open without the token, nothing from
another host), the GPU sample stream and the GPU topology. The page itself is tested in a browser in
test_ui.py."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import httpx

from launcher.api.app import create_app
from launcher.config_file import parse_settings
from launcher.schema_gpus import GpuSample, GpuTopology
from launcher.wiring import Wired
from tests.conftest import OpenWired, write_secret

TOKEN = "t0ken-for-the-page"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
SIM = (
    "{backend: sim, poll_interval: 30, thermal_limit_c: 85, sim: ["
    "{name: A, memory_mib: 8192, link_group: x}, {name: B, memory_mib: 8192, link_group: x},"
    "{name: C, memory_mib: 4096}]}"
)
PAGE_FILES = {"index.html", "app.js", "api.js", "draw.js", "panels.js", "style.css"}


async def client_for(tmp_path: Path, open_wired: OpenWired) -> tuple[httpx.AsyncClient, Wired]:
    write_secret(tmp_path / "token", TOKEN)
    text = (
        f"daemon: {{state_dir: {tmp_path / 'state'}, token_file: token, auth_reads: always}}\n"
        f"gpus: {SIM}\n"
        f"models: {{tiny: {{model: {tmp_path / 'absent.gguf'}}}}}"
    )
    settings = parse_settings(text, tmp_path / "launcher.yaml")
    wired = await open_wired(settings)
    app = create_app(settings, wired, token=TOKEN)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://launcher"), wired


async def test_the_page_loads_without_the_token_and_only_from_the_daemon(tmp_path: Path, open_wired: OpenWired) -> None:
    client, _ = await client_for(tmp_path, open_wired)
    async with client:
        page = await client.get("/ui")
        assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.headers["content-security-policy"].startswith("default-src 'self'")
        types = {"app.js": "text/javascript", "api.js": "text/javascript", "style.css": "text/css"}
        for name, media_type in types.items():
            answer = await client.get(f"/ui/{name}")
            assert answer.status_code == 200 and answer.headers["content-type"].startswith(media_type), name
        missing = await client.get("/ui/nope.js")
        assert missing.status_code == 404 and missing.json()["hint"] == "the page is at /ui"
        for name in ("..%2fopenapi.json", "%2e%2e", "..%2f..%2fpyproject.toml"):  # nothing outside the page's files
            assert (await client.get(f"/ui/{name}")).status_code == 404, name
        for path in ("/gpus/stream", "/gpus/topology", "/instances"):  # what the page reads needs the token
            assert (await client.get(path)).status_code == 401, path


def test_the_page_references_only_its_own_files() -> None:
    """No CDN, no other host: every URL in the page's files is one of its own files or the API's."""
    folder = resources.files("launcher") / "ui"
    shipped = {p.name for p in folder.iterdir() if p.is_file()}
    assert shipped == PAGE_FILES
    for name in shipped:
        text = (folder / name).read_text()
        assert re.findall(r"https?://[^\s\"'`]+", text) in ([], ["http://www.w3.org/2000/svg"]), name
        for referenced in re.findall(r"(?:src|href)=\"ui/([^\"]+)\"|from \"\./([^\"]+)\"", text):
            assert set(referenced) - {""} <= PAGE_FILES, (name, referenced)


async def test_the_gpu_stream_sends_each_gpus_recent_samples_oldest_first(
    tmp_path: Path, open_wired: OpenWired
) -> None:
    client, wired = await client_for(tmp_path, open_wired)
    await wired.sampler.read_now([0, 1, 2])
    await wired.sampler.read_now([0, 1, 2])
    async with client:
        answer = await client.get("/gpus/stream?recent=2&follow=false", headers=BEARER)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
        events = [block.split("\n", 1) for block in answer.text.strip().split("\n\n")]
        assert {kind for kind, _ in events} == {"event: sample"}
        samples = [GpuSample.model_validate_json(data.removeprefix("data: ")) for _, data in events]
        assert sorted(s.index for s in samples) == [0, 0, 1, 1, 2, 2]
        assert [s.time for s in samples] == sorted(s.time for s in samples)
        assert (await client.get("/gpus/stream", headers=BEARER)).text == ""  # follows only when asked to
        refused = await client.get("/gpus/stream?recent=-1", headers=BEARER)
        assert refused.status_code == 422 and refused.json()["detail"].startswith("query.recent:")


async def test_topology_names_each_pair_once_and_the_limits(tmp_path: Path, open_wired: OpenWired) -> None:
    client, _ = await client_for(tmp_path, open_wired)
    async with client:
        topology = GpuTopology.model_validate_json((await client.get("/gpus/topology", headers=BEARER)).content)
    assert [(link.gpus, link.link, link.direct) for link in topology.links] == [
        ((0, 1), "nvlink", True),
        ((0, 2), "cpu", False),
        ((1, 2), "cpu", False),
    ]
    assert (topology.thermal_limit_c, topology.poll_interval_s) == (85.0, 30.0)
