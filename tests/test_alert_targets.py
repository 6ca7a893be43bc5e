"""Alerts delivered to where reliability engineers work: a real Alertmanager (Debian's
`prometheus-alertmanager`) that receives, groups, silences and resolves them, and a PagerDuty
Events API v2 stand-in (no PagerDuty account can be reached from here) that checks the
documented request shape; shelving and maintenance windows hold deliveries back and
release them through the operator API."""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cloud.alert_targets import build
from cloud.maintenance import check_window
from cloud.webhook_records import Delivery
from edge_agent.errors import InvalidInput
from protos.autoglm.v1 import agent_pb2
from tests.support.agents import start_session, wait_for
from tests.support.alerting import T0, Site, cleared, open_site, raised
from tests.support.alertmanager import Alertmanager, Receiver
from tests.test_webhooks import FAST_RETRIES, SECRET
from tests.test_webhooks import Receiver as StandardReceiver

pytestmark = pytest.mark.integration
ROUTING_KEY = "R0UT1NGKEY0123456789abcdefABCDEF"
PD_SEVERITIES = {"critical", "error", "warning", "info"}


class PagerDutyStandIn:
    """A stand-in for PagerDuty's Events API v2 endpoint (POST /v2/enqueue): it validates
    events as the documentation describes them and answers 202 or 400 the same way."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.refused: list[str] = []
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                doc = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                problems = standin.problems(self.path, self.headers["Content-Type"], doc)
                if problems:
                    standin.refused.append("; ".join(problems))
                    answer: dict[str, Any] = {"status": "invalid event", "errors": problems}
                    self.send_response(400)
                else:
                    standin.events.append(doc)
                    answer = {"status": "success", "message": "Event processed",
                              "dedup_key": doc["dedup_key"]}  # fmt: skip
                    self.send_response(202)
                body = json.dumps(answer).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @staticmethod
    def problems(path: str, content_type: str, doc: dict[str, Any]) -> list[str]:
        found = []
        if path != "/v2/enqueue" or content_type != "application/json":
            found.append(f"POST application/json to /v2/enqueue, got {content_type} {path}")
        if doc.get("routing_key") != ROUTING_KEY:
            found.append("routing_key: unknown integration key")
        if doc.get("event_action") not in ("trigger", "acknowledge", "resolve"):
            found.append(f"event_action {doc.get('event_action')!r}")
        if not doc.get("dedup_key") or len(doc["dedup_key"]) > 255:
            found.append("dedup_key: missing or longer than 255")
        if doc.get("event_action") == "trigger":
            payload = doc.get("payload", {})
            for key in ("summary", "source", "severity"):
                if not payload.get(key):
                    found.append(f"payload.{key} is required")
            if payload.get("severity") not in PD_SEVERITIES:
                found.append(f"payload.severity {payload.get('severity')!r}")
            if len(payload.get("summary", "")) > 1024:
                found.append("payload.summary longer than 1024")
        return found

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v2/enqueue"

    def actions(self) -> list[tuple[str, str]]:
        return [(e["event_action"], e["dedup_key"]) for e in self.events]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    with open_site(tmp_path, **FAST_RETRIES) as s:
        yield s


def test_pagerduty_sees_trigger_acknowledge_and_resolve_under_one_dedup_key(site: Site) -> None:
    pd = PagerDutyStandIn()
    try:
        with site.plane.client() as client:
            client.add_webhook(pd.url, ROUTING_KEY, kind="pagerduty")
            site.outbox.append([raised("pump-1", T0, score=2.4)])
            wait_for(lambda: len(pd.events) == 1, timeout=30)
            (alert,) = site.alerts()
            client.alert_action("ack", alert.id, "on my way")
            wait_for(lambda: len(pd.events) == 2, timeout=30)
            done = client.alert_action("resolve", alert.id, "", "true", "impeller wear")
            wait_for(lambda: len(pd.events) == 3, timeout=30)
        assert pd.actions() == [
            ("trigger", alert.id), ("acknowledge", alert.id), ("resolve", alert.id)
        ]  # fmt: skip
        payload = pd.events[0]["payload"]
        assert payload["severity"] == "error" and payload["source"] == "edge-1/pump-1"
        assert payload["group"] == "a" and "2.40" in payload["summary"], payload
        assert (done.verdict, done.fault_type) == ("true", "impeller wear") and not pd.refused
        registry = site.plane.plane.metrics.registry
        labels = {"kind": "pagerduty", "outcome": "delivered"}

        # Counted when the sender has the answer, a moment after the receiver had the event.
        def counted() -> tuple[float | None, float | None]:
            return (
                registry.get_sample_value("autoglm_webhook_attempts_total", labels),
                registry.get_sample_value(
                    "autoglm_webhook_delivery_seconds_count", {"kind": "pagerduty"}
                ),
            )

        wait_for(lambda: counted() == (3, 3), timeout=30)
    finally:
        pd.close()


def test_a_target_that_refuses_an_event_is_not_retried(site: Site) -> None:
    pd = PagerDutyStandIn()
    try:
        with site.plane.client() as client:
            client.add_webhook(pd.url, "WRONGKEY0123456789abcdefABCDEF01", kind="pagerduty")
            site.outbox.append([raised("pump-1", T0)])
            wait_for(lambda: client.list_webhooks()[0].dead == 1, timeout=30)
            (hook,) = client.list_webhooks()
        assert len(pd.refused) == 1 and "routing_key" in pd.refused[0]
        assert hook.last_error.startswith("HTTP 400") and "routing_key" in hook.last_error
        dead = {"kind": "pagerduty", "outcome": "dead"}
        registry = site.plane.plane.metrics.registry
        wait_for(
            lambda: registry.get_sample_value("autoglm_webhook_attempts_total", dead) == 1,
            timeout=30,
        )
    finally:
        pd.close()


def test_alertmanager_receives_groups_silences_and_resolves_our_alerts(
    site: Site, tmp_path: Path
) -> None:
    receiver = Receiver()
    am = Alertmanager(tmp_path / "am", receiver.url)
    try:
        am.add_silence({"asset": "pump-2"})
        with site.plane.client() as client:
            client.add_webhook(am.url, "", kind="alertmanager")
        site.outbox.append([raised("pump-1", T0, score=3.5), raised("pump-2", T0)])
        wait_for(lambda: len(am.alerts()) == 2, timeout=15)
        by_asset = {a["labels"]["asset"]: a for a in am.alerts()}
        labels = by_asset["pump-1"]["labels"]
        assert labels["device"] == "edge-1" and labels["site"] == "a", labels
        assert labels["severity"] == "critical" and labels["model_version"] == "3", labels
        assert by_asset["pump-1"]["annotations"]["top_sensors"].startswith("vibration")
        assert by_asset["pump-2"]["status"]["state"] == "suppressed"  # the silence holds
        firing = receiver.wait_for(lambda got: any(n["status"] == "firing" for n in got), 15)
        notified = {a["labels"]["asset"] for n in firing for a in n["alerts"]}
        assert notified == {"pump-1"}, firing  # grouped by site; the silenced one held back
        assert firing[0]["groupLabels"] == {"alertname": "EquipmentFault", "site": "a"}
        site.outbox.append([cleared("pump-1", T0 + 60)])
        resolved = receiver.wait_for(
            lambda got: any(n["status"] == "resolved" for n in got), timeout_s=15
        )
        (done,) = [a for n in resolved if n["status"] == "resolved" for a in n["alerts"]]
        assert done["labels"]["asset"] == "pump-1" and done["status"] == "resolved"
    finally:
        am.stop()
        receiver.close()


def test_shelving_and_maintenance_hold_deliveries_until_lifted(site: Site) -> None:
    receiver = StandardReceiver().start()
    try:
        with site.plane.client() as client:
            client.add_webhook(receiver.url, SECRET)
            # From before the events' (edge) time: windows are judged at the edge's time.
            since = dt.datetime.fromtimestamp(T0 - 3600, dt.UTC)
            window = client.add_maintenance("site=a", "seal swap", "pump-2", starts_at=since)
            site.outbox.append([raised("pump-1", T0), raised("pump-2", T0)])
            wait_for(lambda: receiver.events() == [("alert.firing", "pump-1")], timeout=30)
            alerts = {a.asset: a for a in site.alerts()}
            assert alerts["pump-2"].suppressed_by == f"maintenance {window.id[:8]}"
            shelved = client.shelve_alert(alerts["pump-1"].id, 3600, "pump on the test bench")
            assert shelved.suppressed_by == "shelved" and shelved.shelved_by == "admin"
            site.outbox.append([raised("pump-1", T0 + 20, score=2.6)])
            wait_for(lambda: site.alerts()[0].peak_score == 2.6, timeout=30)
            client.remove_maintenance(window.id)  # pump-2's alert is delivered now
            wait_for(lambda: len(receiver.accepted) == 2, timeout=30)
            client.unshelve_alert(alerts["pump-1"].id[:8])
            wait_for(lambda: len(receiver.accepted) == 3, timeout=30)
        assert receiver.events() == [
            ("alert.firing", "pump-1"), ("alert.firing", "pump-2"), ("alert.firing", "pump-1")
        ]  # fmt: skip
        assert receiver.accepted[2]["data"]["peak_score"] == 2.6  # kept current while shelved
    finally:
        receiver.stop()


def test_agents_get_the_windows_that_cover_them_at_session_open_and_on_change(
    site: Site,
) -> None:
    site.disconnect()
    got: list[agent_pb2.Maintenance] = []

    def on_control(message: agent_pb2.ControlMessage) -> None:
        if message.WhichOneof("body") == "maintenance":
            got.append(message.maintenance)

    with site.plane.client() as client:
        mine = client.add_maintenance("site=a", "seal swap", asset="pump-2")
        client.add_maintenance("site=b", "not this device's")
        session = start_session(site.identity, on_control=on_control)
        try:
            wait_for(lambda: len(got) == 1, timeout=30)
            assert [(p.id, p.asset) for p in got[0].periods] == [(mine.id, "pump-2")]
            assert not got[0].periods[0].HasField("ends_at")  # out of service until removed
            client.remove_maintenance(mine.id)
            wait_for(lambda: len(got) == 2, timeout=30)
            assert list(got[1].periods) == []
        finally:
            session.stop()


def test_alertmanager_labels_keep_the_opening_severity_as_the_peak_rises() -> None:
    alert = {
        "id": "a-1", "device_name": "edge-1", "asset": "pump-1", "fault": "anomaly",
        "state": "firing", "peak_score": 3.5, "opening_score": 1.3, "model_version": "4",
        "opening_model_version": "3", "first_seen": "2026-11-29T10:00:00+00:00",
        "top_sensors": [{"sensor": "flow", "contribution": 0.9}],
    }  # fmt: skip
    payload = {"alert": alert, "device_labels": {"site": "a", "bad label": "x"}}
    d = Delivery(1, "w", "http://am:9093", "", "a-1", 5, payload, 1, kind="alertmanager")
    now = dt.datetime(2026, 11, 29, 10, 5, tzinfo=dt.UTC)
    request = build(d, [""], now, (), hold_s=900)
    (sent,) = json.loads(request.body)
    assert request.url == "http://am:9093/api/v2/alerts"
    assert sent["labels"]["severity"] == "minor" and sent["labels"]["model_version"] == "3"
    assert sent["annotations"]["severity_now"] == "critical" and "bad label" not in sent["labels"]
    assert sent["endsAt"] == (now + dt.timedelta(seconds=900)).isoformat()


@pytest.mark.parametrize(
    ("selector", "message"), [(",", "names no label"), (" , ", "names no label"), ("", "needs")]
)
def test_a_window_must_name_labels(selector: str, message: str) -> None:
    now = dt.datetime(2026, 11, 29, tzinfo=dt.UTC)
    with pytest.raises(InvalidInput, match=message):
        check_window(selector, "", now, None, "reason", now)
