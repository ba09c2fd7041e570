"""The dashboard at /ui in a real browser (Debian's chromium driven by Playwright) against a real daemon with
simulated GPUs and real tiny llama-servers: what it shows is what the API says, live, without a reload.

Nothing here sleeps: each step waits for the page (a selector, a function over the DOM) or the daemon
(poll_until) to get where it must. Screenshots land in the test's tmp_path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect

from tests.conftest import ConfigWriter, Daemon, write_secret

WAIT_MS = 30_000
SIM: list[dict[str, Any]] = [
    {"name": "Sim 3090", "memory_mib": 24576, "used_mib": 300, "temperature_c": [40, 50, 60], "link_group": "a"}
    | {"link_tx_mib_per_s": 1000, "link_rx_mib_per_s": 2000},
    {"name": "Sim 4080", "memory_mib": 4096, "pcie_gen": 3, "link_group": "a", "link_tx_mib_per_s": 2000},
]
GPUS = {"backend": "sim", "poll_interval": 0.1, "sim": SIM}
# tiny runs on GPU 0; big cannot fit GPU 1 at that context.
MODELS: dict[str, dict[str, Any]] = {"tiny": {"autostart": True, "gpus": [0]}, "big": {"gpus": [1], "ctx": 4_000_000}}
TERMS = {"weights": "weights_mib", "kv": "kv_cache_mib", "compute": "compute_mib", "overhead": "overhead_mib"}


class Dashboard:
    """One page of the dashboard, with every request it made and every console error it logged."""

    def __init__(self, browser: Browser, daemon: Daemon, **context: Any) -> None:
        self.daemon = daemon
        self.page: Page = browser.new_page(**context)
        self.page.set_default_timeout(WAIT_MS)
        self.requested: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requested.append(r.url))
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(f"{daemon.url}/ui")

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"{message.text} ({message.location['url']})")

    def text(self, selector: str) -> str:
        return self.page.locator(selector).inner_text()

    def shows(self, selector: str, text: str) -> None:
        """Wait until the element holds ``text``."""
        expect(self.page.locator(selector)).to_contain_text(text, timeout=WAIT_MS)

    def wait(self, expression: str, arg: Any = None) -> Any:
        """The (truthy) value of a JavaScript function of ``arg`` once it has one."""
        return self.page.wait_for_function(expression, arg=arg).json_value()

    def unexpected_errors(self, *allowed: str) -> list[str]:
        """Console errors, less the browser's note of a 404 from /requests while the daemon has no front
        door, and those naming one of ``allowed``."""
        no_front_door = self.daemon.http.get("/requests").status_code == 404
        return [
            e
            for e in self.errors
            if not (no_front_door and "404" in e and "/requests?" in e) and not any(a in e for a in allowed)
        ]


Start = Callable[..., Dashboard]


@pytest.fixture
def dashboard(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon], browser: Browser
) -> Callable[..., Dashboard]:
    """A daemon of ``models`` on ``gpus`` (with ``daemon`` settings, read with ``token``), once the ``ready``
    instances are, and the dashboard open on it."""

    def open_one(
        models: dict[str, dict[str, Any]] = MODELS,
        gpus: dict[str, Any] = GPUS,
        ready: tuple[str, ...] = ("tiny",),
        token: str | None = None,
        **top: Any,
    ) -> Dashboard:
        daemon = start_daemon(write_config(models, gpus=gpus, **top))
        if token is not None:  # the test's own reads carry it
            daemon.http.headers["Authorization"] = f"Bearer {token}"
        for name in ready:
            daemon.wait_for(name, lambda s: s["state"] == "ready")
        return Dashboard(browser, daemon)

    return open_one


def more_points(page: Dashboard, gpu: int, metric: str, than: int) -> int:
    """How many points a GPU's chart holds, once that is more than ``than``."""
    chart = f'#gpus [data-gpu="{gpu}"] svg[data-metric="{metric}"]'
    held: int = page.wait(
        "([chart, than]) => { const n = +document.querySelector(chart)?.dataset.points; return n > than && n; }",
        [chart, than],
    )
    return held


def test_page_is_self_contained_live_and_fits_a_phone(dashboard: Start, tmp_path: Path) -> None:
    page = dashboard()
    daemon = page.daemon
    page.shows('#gpus [data-gpu="0"] h3', "GPU 0 · Sim 3090")
    page.shows('#gpus [data-gpu="1"] h3', "GPU 1 · Sim 4080")
    page.shows('#gpus [data-gpu="1"]', "PCIe gen3 x16, below its gen4 x16")
    page.shows("#links", "GPU 0 ↔ GPU 1: nvlink (direct), 0→1 1.0 GB/s, 1→0 2.1 GB/s")
    page.shows('#gpus [data-gpu="1"] .traffic', "PCIe TX 0 B/s RX 0 B/s · nvlink 0 to GPU 0: TX 2.1 GB/s RX 0 B/s")

    # Charts hold points, and more as samples arrive (the sampler reads every 0.1 s).
    held = more_points(page, 0, "memory", 2)
    more_points(page, 0, "memory", held)
    more_points(page, 1, "temperature", 2)
    page.shows('#gpus [data-gpu="0"] figure:has([data-metric="temperature"])', "60 °C, limit 90 °C")

    # The planned bar of GPU 0 is tiny's plan there, term by term; beside it what the GPU reports.
    page.page.wait_for_selector('#gpus [data-gpu="0"] .planned .seg[data-instance="tiny"]')
    [device] = [d for d in daemon.http.get("/plan/tiny").json()["devices"] if d["gpu"] == 0]
    drawn = page.page.eval_on_selector_all(
        '#gpus [data-gpu="0"] .planned .seg',
        "segs => segs.map(s => [s.dataset.instance, s.dataset.term, +s.dataset.mib])",
    )
    assert drawn == [["tiny", term, device[key]] for term, key in TERMS.items()]
    used = daemon.http.get("/gpus").json()[0]["memory_used_mib"]
    expect(page.page.locator('#gpus [data-gpu="0"] .used .seg')).to_have_attribute("data-mib", str(used))
    page.shows('#gpus [data-gpu="1"] .memory', "nothing planned here")

    requests = daemon.http.get("/requests")
    if requests.status_code == 404 or requests.json() == []:
        page.page.wait_for_selector("#requests >> text=no requests yet")
    page.shows("#request-counts", "tiny: 0 in flight, 0 queued")

    for scheme in ("dark", "light"):
        page.page.emulate_media(color_scheme=scheme)
        page.page.screenshot(path=tmp_path / f"dashboard-{scheme}.png", full_page=True)
    page.page.set_viewport_size({"width": 390, "height": 844})
    page.page.select_option("#plan-model", "big")  # the widest drawing there is: a refusal
    page.page.wait_for_selector(".plan.refused")
    assert page.page.evaluate("document.scrollingElement.scrollWidth <= window.innerWidth")
    page.page.screenshot(path=tmp_path / "dashboard-phone.png", full_page=True)

    hosts = {urlsplit(url).netloc for url in page.requested}
    assert hosts == {urlsplit(daemon.url).netloc}, page.requested
    assert page.unexpected_errors() == []


def test_buttons_act_and_the_page_follows_without_reload(dashboard: Start) -> None:
    page = dashboard()
    daemon = page.daemon
    card = '[data-instance="tiny"]'
    before = daemon.instance("tiny")
    page.page.wait_for_selector(f"{card} .state.ready")
    assert page.text(f"{card} .pid .v") == str(before["pid"])

    page.page.click(f"{card} button.log")
    page.page.wait_for_selector("#log >> text=starting tiny")

    page.page.click(f"{card} button.restart")
    after = daemon.wait_for("tiny", lambda s: s["state"] == "ready" and s["pid"] != before["pid"])
    page.page.wait_for_selector(f'{card} .pid .v >> text="{after["pid"]}"')
    page.page.wait_for_selector(f"{card} .state.ready")
    # The log view follows: the second start's marker line arrives.
    page.wait("() => document.getElementById('log').textContent.split('starting tiny').length > 2")
    # Events, newest first: the restart's last step, ready, is at the top.
    page.page.wait_for_selector("#events li:first-child >> text=tiny: ready")
    times = page.page.eval_on_selector_all("#events time", "ts => ts.map(t => t.dateTime)")
    assert times == sorted(times, reverse=True) and len(times) > 5

    page.page.click(f"{card} button.stop")
    page.page.wait_for_selector(f"{card} .state.stopped")
    assert daemon.instance("tiny")["state"] == "stopped"
    assert page.page.is_disabled(f"{card} button.stop")
    page.page.click(f"{card} button.start")
    page.page.wait_for_selector(f"{card} .state.ready")
    assert page.unexpected_errors() == []


def test_plan_view_draws_a_fitting_and_a_refused_plan(dashboard: Start) -> None:
    page = dashboard()
    daemon = page.daemon
    page.page.select_option("#plan-model", "tiny")
    page.page.wait_for_selector(".plan.fits .column[data-gpu='0']")
    plan = daemon.http.get("/plan/tiny").json()
    drawn = page.page.eval_on_selector_all(".plan .column[data-gpu='0'] .fill .seg", "s => s.map(x => +x.dataset.mib)")
    assert drawn == [plan["devices"][0][key] for key in TERMS.values()]
    usable = page.page.get_attribute(".plan .column[data-gpu='0'] .usable", "data-mib")
    assert usable == str(plan["devices"][0]["usable_mib"])
    assert "layers 0-" in page.text(".plan .column[data-gpu='0'] .layers")
    device = plan["devices"][0]
    strip = page.page.eval_on_selector_all(".plan .strip .part", "s => s.map(x => [+x.dataset.gpu, +x.dataset.layers])")
    assert strip == [[0, device["layers"] + device["output_layer"]]]

    page.page.select_option("#plan-model", "big")
    page.page.wait_for_selector(".plan.refused")
    refusal = daemon.http.get("/plan/big").json()
    assert refusal["fits"] is False
    assert page.text(".plan .verdict") == "does not fit"
    assert page.text(".plan .reason") == refusal["reason"]
    assert page.page.eval_on_selector_all(".suggestions li", "s => s.map(x => x.textContent)") == refusal["suggestions"]
    assert page.page.is_visible(".plan .column.over[data-gpu='1'] .overflow")
    assert page.unexpected_errors() == []


def test_plan_view_shows_planned_and_actual_side_by_side(dashboard: Start) -> None:
    """A running server's plan: per device the planned bar and the actual one, term by term as the API's
    check says (on simulated GPUs the server runs on the CPU: GPU 0 is planned and not in its log)."""
    page = dashboard()
    daemon = page.daemon
    actual = daemon.wait_for("tiny", lambda s: s["actual"] is not None)["actual"]
    page.page.select_option("#plan-model", "big")  # then back: the view is drawn with the check there
    page.page.wait_for_selector(".plan.refused")
    page.page.select_option("#plan-model", "tiny")
    page.page.wait_for_selector(".plan .check .check-device")
    drawn = page.page.eval_on_selector_all(".plan .check-device", "ds => ds.map(d => d.dataset.device)")
    assert drawn == [d["device"] for d in actual["devices"]]
    for device in actual["devices"]:
        row = f'.plan .check-device[data-device="{device["device"]}"]'
        for side in ("planned", "actual"):
            mibs = page.page.eval_on_selector_all(f"{row} .bar.{side} .seg", "s => s.map(x => +x.dataset.mib)")
            assert mibs == [term[f"{side}_mib"] for term in device["terms"].values()]
        assert page.page.get_attribute(f"{row} .difference", "data-mib") == f"{device['difference_mib']:g}"
    assert "estimated" in page.text(".plan .terms")
    assert page.unexpected_errors() == []


def test_plan_view_draws_a_tensor_split_as_shares_of_every_layer(dashboard: Start) -> None:
    linked = {"backend": "sim", "sim": [{"name": "Sim", "memory_mib": 1900, "link_group": "a"}] * 2}
    page = dashboard(models={"wide": {"ctx": 262144}}, gpus=linked, ready=())
    page.page.select_option("#plan-model", "wide")
    page.page.wait_for_selector(".plan.fits .column[data-gpu='1']")
    plan = page.daemon.http.get("/plan/wide").json()
    assert plan["split_mode"] == "tensor"
    assert page.text(".plan .split-mode") == "split mode tensor: GPUs 0 and 1 are nvlink-linked"
    assert page.text(".plan .column[data-gpu='1'] .layers") == "a share of all 4 layers"
    parts = "s => s.map(x => [+x.dataset.gpu, +x.dataset.layers])"
    strip = page.page.eval_on_selector_all(".plan .strip.tensor .part", parts)
    assert strip == [[0, 4], [1, 4]]
    assert page.unexpected_errors() == []


def test_requests_panel_lists_the_front_doors_requests(dashboard: Start) -> None:
    page = dashboard()
    page.page.wait_for_selector("#requests >> text=no requests yet")
    answer = page.daemon.http.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 4})
    assert answer.status_code == 200
    [record] = page.daemon.http.get("/requests").json()
    row = "#requests tbody tr:first-child"
    page.shows(row, "POST /v1/completions")
    cells = page.page.eval_on_selector_all(f"{row} td", "tds => tds.map(td => td.textContent)")
    assert cells[1:4] == ["tiny", record["instance"], "200"]
    assert cells[6] == f"{record['duration_ms']:.0f}"
    page.shows("#request-counts", "tiny: 0 in flight, 0 queued")
    assert page.unexpected_errors() == []


TOKEN = "s3cret-token"


def token_config(tmp_path: Path, auth_reads: str) -> dict[str, Any]:
    write_secret(tmp_path / "token", TOKEN)
    return {"token_file": str(tmp_path / "token"), "auth_reads": auth_reads}


def answer_token(page: Dashboard, token: str | None) -> str:
    """What the token dialog says once open; then type ``token`` into it, or cancel it (None). The dialog
    closes on the click itself: a later call waits for the next question."""
    page.page.wait_for_selector("#token-dialog[open]")
    why = page.text("#token-why")
    if token is None:
        page.page.click("#token-dialog button[value=cancel]")
    else:
        page.page.fill("#token-input", token)
        page.page.click("#token-dialog button[value=ok]")
    return why


def test_acts_ask_for_the_token_and_a_wrong_one_is_refused(dashboard: Start, tmp_path: Path) -> None:
    page = dashboard(daemon=token_config(tmp_path, "auto"), token=TOKEN)  # loopback: reads are open, acts are not
    card = '[data-instance="tiny"]'
    page.page.wait_for_selector(f"{card} .state.ready")
    assert not page.page.is_visible("#token-dialog")

    page.page.click(f"{card} button.stop")
    assert "stop tiny needs the daemon's API token" in answer_token(page, None)
    page.page.wait_for_selector(f"{card} .message.error >> text=stop refused")
    assert page.daemon.instance("tiny")["state"] == "ready"

    page.page.click(f"{card} button.stop")
    answer_token(page, "wrong")
    assert "The token was refused" in answer_token(page, TOKEN)
    page.page.wait_for_selector(f"{card} .state.stopped")
    assert page.daemon.instance("tiny")["state"] == "stopped"
    # Kept for the session: the next act does not ask.
    page.page.click(f"{card} button.start")
    page.page.wait_for_selector(f"{card} .state.ready")
    assert not page.page.is_visible("#token-dialog")
    assert page.unexpected_errors("401") == []


def test_locked_reads_load_the_page_then_ask_once(dashboard: Start, tmp_path: Path) -> None:
    page = dashboard(daemon=token_config(tmp_path, "always"), token=TOKEN)
    assert "needs the daemon's API token" in answer_token(page, TOKEN)
    # Every read, streams included, now carries it: GPUs, instances, events all arrive.
    page.page.wait_for_selector('#gpus [data-gpu="1"] svg[data-metric="memory"][data-points]')
    page.page.wait_for_selector('[data-instance="tiny"] .state.ready')
    page.page.wait_for_selector("#events li >> text=tiny: ready")
    page.page.wait_for_selector("#connection >> text=live")
    assert not page.page.is_visible("#token-dialog")
    assert page.unexpected_errors("401") == []


def test_without_gpus_the_panel_says_so(dashboard: Start) -> None:
    page = dashboard({"tiny": {}}, gpus={"backend": "none"}, ready=())
    page.page.wait_for_selector("#gpus >> text=no GPU")
    assert page.page.query_selector_all("#gpus svg, #gpus .bar") == []
    page.page.wait_for_selector('[data-instance="tiny"] .state.stopped')
    assert page.unexpected_errors() == []


def test_a_server_that_cannot_start_shows_its_own_words_on_its_card(
    dashboard: Start, llama_server_without_help: Path
) -> None:
    model = {"binary": str(llama_server_without_help), "args": ["--no-mmap"]}
    page = dashboard({"tiny": model}, gpus={"backend": "none"}, ready=())
    page.page.locator('[data-instance="tiny"] button.start').click()
    page.page.wait_for_selector('[data-instance="tiny"] .state.failed')
    page.shows('[data-instance="tiny"] .exit', "error: error: invalid argument: --no-mmap")
    assert page.unexpected_errors() == []


def test_remote_part_shows_the_peers_models_and_a_peer_going_away(
    write_config: ConfigWriter,
    start_daemon: Callable[[Path], Daemon],
    standin: Path,
    browser: Browser,
    tmp_path: Path,
) -> None:
    # The peer: its own state directory, port and token, serving one model through its front door.
    write_secret(tmp_path / "b.token", TOKEN)
    (tmp_path / "b").mkdir()
    b_config = write_config(
        {"far": {"binary": str(standin), "autostart": True}},
        daemon={"state_dir": str(tmp_path / "b" / "state"), "token_file": str(tmp_path / "b.token")},
    )
    b = start_daemon(b_config.rename(tmp_path / "b" / "launcher.yaml"))
    b.wait_for("far", lambda s: s["state"] == "ready")
    peers = [{"url": b.url, "name": "b", "token_file": str(tmp_path / "b.token")}]
    a = start_daemon(write_config({"here": {"binary": str(standin)}}, peers=peers, rpc={"peer_interval_s": 0.2}))
    page = Dashboard(browser, a)

    peer = '#remote [data-peer="b"]'
    page.page.wait_for_selector(f"{peer} .reach.ok")
    page.shows(f"{peer} .url", b.url)
    page.page.wait_for_selector(f'{peer} [data-model="far"] .state.ready')
    page.shows(f'{peer} [data-model="far"]', "far ready on b")
    page.page.wait_for_selector('[data-instance="here"] .state.stopped')  # this daemon's own, apart

    b.stop()  # the page learns it from its next read of /peers, without a reload
    page.page.wait_for_selector(f"{peer} .reach.error")
    page.shows(f'{peer} [data-model="far"]', "unreachable (was ready)")
    assert page.unexpected_errors() == []
