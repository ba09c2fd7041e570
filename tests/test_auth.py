"""Who may read and who may act: mutations always need the token when one is configured; reads need it
too off loopback (`daemon.auth_reads: auto`), or always, or never; /health never does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from launcher.api.app import create_app
from launcher.api.auth import reads_need_token
from launcher.config_file import parse_settings
from launcher.schema_reload import UpgradeStarted
from tests.conftest import OpenWired, write_secret

TOKEN = "t0ken-for-reads"
READS = ["/instances", "/instances/tiny", "/gpus", "/plan/tiny", "/metrics", "/openapi.json", "/docs", "/nowhere"]


@pytest.mark.parametrize(
    ("auth_reads", "loopback", "needed"),
    [("auto", True, False), ("auto", False, True), ("always", True, True), ("never", False, False)],
)
def test_when_reads_need_the_token(auth_reads: Any, loopback: bool, needed: bool) -> None:
    assert reads_need_token(auth_reads, loopback) is needed


async def client_for(tmp_path: Path, open_wired: OpenWired, auth_reads: str) -> httpx.AsyncClient:
    write_secret(tmp_path / "token", TOKEN)
    text = (
        f"daemon: {{state_dir: {tmp_path / 'state'}, token_file: token, auth_reads: {auth_reads}}}\n"
        f"models: {{tiny: {{model: {tmp_path / 'absent.gguf'}}}}}"
    )
    settings = parse_settings(text, tmp_path / "launcher.yaml")
    app = create_app(settings, await open_wired(settings), token=TOKEN)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://launcher")


async def test_locked_reads_answer_401_without_the_token(tmp_path: Path, open_wired: OpenWired) -> None:
    async with await client_for(tmp_path, open_wired, "always") as client:
        assert (await client.get("/health")).status_code == 200  # probes never need it
        for path in READS:
            refused = await client.get(path)
            assert refused.status_code == 401, path
            assert refused.headers["www-authenticate"] == "Bearer"
            assert refused.json() == {
                "detail": "this needs Authorization: Bearer <token>",
                "hint": "see daemon.token_file",
            }
        assert (await client.get("/instances", headers={"Authorization": "Bearer wrong"})).status_code == 401
        allowed = await client.get("/instances", headers={"Authorization": f"Bearer {TOKEN}"})
        assert allowed.status_code == 200 and allowed.json()[0]["name"] == "tiny"
        document = (await client.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})).json()
        assert "401" in document["paths"]["/gpus"]["get"]["responses"]  # the document says so too
        assert "401" not in document["paths"]["/health"]["get"]["responses"]


async def test_open_reads_on_loopback_but_acts_need_the_token(tmp_path: Path, open_wired: OpenWired) -> None:
    async with await client_for(tmp_path, open_wired, "auto") as client:
        assert (await client.get("/instances")).status_code == 200
        assert (await client.get("/gpus")).status_code == 200
        document = (await client.get("/openapi.json")).json()
        assert "401" not in document["paths"]["/gpus"]["get"]["responses"]
        refused = await client.post("/instances/tiny/start")
        assert refused.status_code == 401
        # With the token the act goes through to the instance: its model file is missing (422, a clear error).
        acted = await client.post("/instances/tiny/start", headers={"Authorization": f"Bearer {TOKEN}"})
        assert acted.status_code == 422
        assert acted.json()["detail"] == f"model file {tmp_path / 'absent.gguf'} for 'tiny' does not exist"


async def test_an_unexpected_error_is_answered_500_in_the_apis_shape(tmp_path: Path, open_wired: OpenWired) -> None:
    """A defect under a route (here the upgrade's start) is answered in ErrorBody, not in plain text."""
    settings = parse_settings(f"daemon: {{state_dir: {tmp_path / 'state'}}}\nmodels: {{}}", tmp_path / "l.yaml")

    async def upgrade() -> UpgradeStarted:
        raise RuntimeError("a defect")

    app = create_app(settings, await open_wired(settings), upgrade=upgrade)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://launcher") as client:
        answer = await client.post("/daemon/upgrade")
    assert answer.status_code == 500
    assert answer.json() == {
        "detail": "the daemon failed on this request: RuntimeError",
        "hint": "see the daemon's log",
    }
