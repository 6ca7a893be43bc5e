"""The console in a real browser (Debian's Chromium driven by Playwright) against a real
control plane, real agents over a real Mosquitto installing a model trained in the test, and
a device's real sync path for predictions, alerts and captured windows: sign in, see the
fleet, watch a rollout reach 100 % without reloading, see an alert arrive on the live list,
its charts drawn (score timeline, top sensors' contributions, the raw window the device
captured), and acknowledge it with a verdict that the CLI then shows; a viewer is refused
every action."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from edge_agent.config import load_agent_config
from edge_agent.outbox import Outbox
from protos.autoglm.v1 import operator_pb2
from tests.conftest import register
from tests.support.agents import AgentThread, enroll_identity, start_agent, wait_for
from tests.support.alerting import Site
from tests.support.broker import Broker
from tests.support.bundles import make_version
from tests.support.cloud import RunningPlane, init_plane, start_plane
from tests.support.console import chromium, console_url, feed_alert
from tests.test_cli_e2e import autoglm

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]
LOGIN = re.compile(r"/login\?next=")
WAIT_MS = 120_000  # generous: a busy 2-core machine; conditions, never fixed sleeps
# Draws the chart's SVG on a canvas and counts the pixels of its first series' colour: the
# chart is not only in the DOM but rendered with a line in it.
INK = """async (svg) => {
  const xml = new XMLSerializer().serializeToString(svg);
  const img = new Image();
  img.src = "data:image/svg+xml;base64," + btoa(unescape(encodeURIComponent(xml)));
  await img.decode();
  const canvas = document.createElement("canvas");
  canvas.width = img.width; canvas.height = img.height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const d = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  let line = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (Math.abs(d[i] - 31) < 40 && Math.abs(d[i + 1] - 111) < 40 && d[i + 2] > 190) line++;
  }
  return line;
}"""


@dataclass
class ConsoleFleet:
    plane: RunningPlane
    agents: list[AgentThread]
    site: Site
    root: Path

    @property
    def url(self) -> str:
        return console_url(self.plane)


@pytest.fixture
def fleet(
    tmp_path: Path, broker: Broker, trained: tuple[Path, ed25519.Ed25519PrivateKey]
) -> Iterator[ConsoleFleet]:
    """Two agents (labels site=a, role=pump) with no model yet, model pump:1 pushed, and
    edge-1 (site=a) syncing predictions and alerts from its outbox; the console on."""
    cloud = tmp_path / "cloud"
    plane = start_plane(
        cloud,
        init_plane(cloud).operator_token,
        console_listen="127.0.0.1:0",
        presence_flush_interval_s=0.2,
        rollout_interval_s=0.2,
    )
    key = plane.plane.secrets.signing_key
    with plane.client() as client:
        client.push_bundle(make_version(trained, tmp_path / "v1", "1", key))
    agents = []
    for i, name in enumerate(("edge-a", "edge-b")):
        state = tmp_path / name
        enroll_identity(register(plane, name, site="a", role="pump"), state)
        config = {
            "state_dir": state,
            "cloud": {"heartbeat_interval_s": 0.2},
            "reconnect": {"initial_s": 0.2, "max_s": 1.0},
            "mqtt": {"port": broker.port, "host": "127.0.0.1", "alert_prefix": name},
            "assets": [{"name": f"pump-{i}", "topics": [f"plant/pump-{i}/+"]}],
            "updates": {"retry_initial_s": 0.1, "retry_max_s": 0.5, "download_attempts": 3},
            "metrics": {"listen": ""},
        }
        agents.append(start_agent(load_agent_config(None, config)))
    identity = enroll_identity(register(plane, "edge-1", site="a"), tmp_path / "edge")
    site = Site(plane, identity, Outbox(tmp_path / "edge" / "outbox.sqlite3", 1 << 22), tmp_path)
    site.connect()
    with plane.client() as client:
        wait_for(lambda: sum(d.online for d in client.list_devices()) == 3, timeout=30)
    yield ConsoleFleet(plane, agents, site, tmp_path)
    site.disconnect()
    site.outbox.close()
    for agent in agents:
        agent.stop()
    plane.stop()


def sign_in(page: Any, url: str, token: str) -> None:
    page.goto(url + "/fleet")
    page.wait_for_url(LOGIN)
    page.fill("#token", token)
    page.click("form.login button")
    page.wait_for_url("**/fleet")


def cli(f: ConsoleFleet, *args: str) -> Any:
    flags = ["--server", f.plane.api_address, "--ca-cert", str(f.root / "cloud" / "ca.crt"),
             "--token", f.plane.token]  # fmt: skip
    return json.loads(autoglm(f.root, *flags, *args, "--json").stdout)


def test_an_operator_runs_the_fleet_from_the_browser(fleet: ConsoleFleet, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        sign_in(page, fleet.url, fleet.plane.token)

        # The fleet: every device with its state and labels; a label selector narrows it.
        rows = page.locator("#devices tbody tr")
        expect(rows).to_have_count(3)
        for name in ("edge-a", "edge-b", "edge-1"):
            expect(page.locator("#devices")).to_contain_text(name)
        expect(page.locator("#devices .state.online")).to_have_count(3)
        page.fill("input[name=selector]", "role=pump")
        page.click("form.filter button")
        expect(rows).to_have_count(2)
        expect(page.locator("#devices")).not_to_contain_text("edge-1")
        page.screenshot(path=tmp_path / "fleet.png")

        # A rollout, watched on its page until every device is updated: the page refreshes
        # its live part itself (the marker set now survives: no reload).
        with fleet.plane.client() as client:
            rollout = client.create_rollout(
                operator_pb2.CreateRolloutRequest(
                    model_name="pump",
                    model_version="1",
                    selector="role=pump",
                    waves=["1", "100%"],
                    soak_seconds=0,
                )
            )
        page.goto(f"{fleet.url}/rollouts/{rollout.id}")
        page.evaluate("window.sameDocument = true")
        expect(page.locator("#rollout-live .percent")).to_have_text("100 %", timeout=WAIT_MS)
        expect(page.locator("#rollout-state")).to_have_text("succeeded", timeout=WAIT_MS)
        assert page.evaluate("window.sameDocument") is True
        expect(page.locator("#waves tbody tr")).to_have_count(2)
        expect(page.locator("#rollout-devices .state.updated")).to_have_count(2)
        page.screenshot(path=tmp_path / "rollout.png", full_page=True)
        page.goto(f"{fleet.url}/fleet?selector=role%3Dpump")
        expect(page.locator("#devices")).to_contain_text("pump:1")
        page.locator("#devices a", has_text="edge-a").click()
        expect(page.locator(".facts")).to_contain_text("pump:1")
        expect(page.locator("#health")).to_be_visible()

        # The live alert list: an alert raised on the device appears without a reload.
        page.goto(f"{fleet.url}/alerts")
        expect(page.locator("#alerts[data-live='1']")).to_have_count(1, timeout=WAIT_MS)
        page.evaluate("window.sameDocument = true")
        alert = feed_alert(fleet.site)
        row = page.locator(f"#alert-rows tr[data-alert-id='{alert.id}']")
        expect(row).to_contain_text("pump-1", timeout=WAIT_MS)
        expect(row).to_contain_text("firing")
        assert page.evaluate("window.sameDocument") is True

        # The alert's page: its score timeline and top sensors drawn from synced predictions.
        row.locator("a").first.click()
        page.wait_for_url(f"**/alerts/{alert.id}")
        charts = page.locator("svg.chart")
        expect(charts).to_have_count(3)
        score_line = page.locator("svg.chart polyline.series").first
        assert int(score_line.get_attribute("data-points") or 0) >= 40
        sensors = page.locator("svg.chart").nth(1).locator("polyline.series")
        assert {sensors.nth(i).get_attribute("data-series") for i in range(sensors.count())} == {
            "flow",
            "current",
        }
        # The raw window the device captured when it raised, its top sensors in calibration
        # deviations.
        raw = charts.nth(2).locator("polyline.series")
        assert [raw.nth(i).get_attribute("data-series") for i in range(raw.count())] == [
            "flow",
            "current",
        ]
        assert raw.first.get_attribute("data-points") == "24"
        assert page.evaluate(INK, charts.first.element_handle()) > 200
        shot = charts.first.screenshot(path=tmp_path / "alert-chart.png")
        assert len(shot) > 2000
        page.screenshot(path=tmp_path / "alert.png", full_page=True)

        # Acknowledge with a verdict; the page and the CLI agree.
        ack = page.locator("form[action$='/ack']")
        ack.locator("select[name=verdict]").select_option("true")
        ack.locator("input[name=note]").fill("bearing noise confirmed on site")
        ack.locator("button").click()
        expect(page.locator(".banner.notice")).to_have_text("Acknowledged.")
        expect(page.locator("#alert-facts")).to_contain_text("acknowledged")
        shown = cli(fleet, "alerts", "show", alert.id)
        assert shown["state"] == "acknowledged" and shown["verdict"] == "true", shown
        assert any("bearing noise confirmed on site" in n for n in shown["notes"])


def test_a_viewer_sees_the_console_and_every_action_is_refused(fleet: ConsoleFleet) -> None:
    from playwright.sync_api import expect

    alert = feed_alert(fleet.site)
    with fleet.plane.client() as admin:
        token = admin.add_operator("watcher", "viewer").token
        rollout = admin.create_rollout(
            operator_pb2.CreateRolloutRequest(
                model_name="pump", model_version="1", selector="role=pump", waves=["100%"]
            )
        )
    with chromium() as browser:
        page = browser.new_page()
        sign_in(page, fleet.url, token)
        expect(page.locator("#devices tbody tr")).to_have_count(3)
        page.goto(f"{fleet.url}/alerts/{alert.id}")
        ack = page.locator("form[action$='/ack']")
        ack.locator("select[name=verdict]").select_option("false")
        ack.locator("button").click()
        expect(page.locator(".banner.error")).to_contain_text("Permission denied")
        expect(page.locator(".banner.error")).to_contain_text("AckAlert needs the operator role")
        page.goto(f"{fleet.url}/rollouts/{rollout.id}")
        page.locator("form[action$='/abort'] button").click()
        expect(page.locator(".banner.error")).to_contain_text("AbortRollout needs the operator")
    with fleet.plane.client() as admin:
        assert admin.get_alert(alert.id).state == operator_pb2.Alert.STATE_FIRING
        assert admin.get_rollout(rollout.id).state != operator_pb2.Rollout.STATE_ABORTED


def test_no_page_opens_without_a_token(fleet: ConsoleFleet) -> None:
    from playwright.sync_api import expect

    with chromium() as browser:
        page = browser.new_page()
        for path in ("/", "/fleet", "/rollouts", "/alerts", "/devices/edge-a", "/alerts/x"):
            page.goto(fleet.url + path)
            page.wait_for_url(LOGIN)
            expect(page.locator("#devices")).to_have_count(0)
            expect(page.locator("h1")).to_have_text("Sign in")
        page.fill("#token", "agt_op_guessed")
        page.click("form.login button")
        expect(page.locator(".banner.error")).to_contain_text("not a live operator token")
        # A script's request without a session is refused too.
        assert page.request.get(fleet.url + "/live/alerts").status == 401
