"""Alerts end to end over the agent's real sync path (outbox → session → store) and the
operator API: grouped, once per episode, through watch streams and lists, with the agent
and the control plane restarted in between; the CLI on top; watch streams per operator
capped."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud.client import OperatorClient
from edge_agent.errors import RateLimited
from protos.autoglm.v1 import operator_pb2
from tests.support.agents import wait_for
from tests.support.alerting import T0, Site, Watcher, cleared, open_site, prediction, raised
from tests.support.cloud import RunningPlane
from tests.test_cli_e2e import autoglm

pytestmark = pytest.mark.integration
FIRING = operator_pb2.Alert.STATE_FIRING
ACKED = operator_pb2.Alert.STATE_ACKNOWLEDGED
RESOLVED = operator_pb2.Alert.STATE_RESOLVED
RETURNED = operator_pb2.Alert.STATE_RETURNED


@pytest.fixture
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Site]:
    """SQLite, or PostgreSQL with `indirect` "postgres"."""
    database = (
        request.getfixturevalue("pg_url") if getattr(request, "param", "") == "postgres" else ""
    )
    with open_site(tmp_path, database) as s:
        yield s


@pytest.mark.parametrize(
    "site",
    [pytest.param("sqlite"), pytest.param("postgres", marks=pytest.mark.postgres)],
    indirect=True,
)
def test_alerts_arrive_once_through_watch_and_list_across_restarts(site: Site) -> None:
    client = site.plane.client()
    watcher = Watcher(client).start()
    site.outbox.append([prediction("pump-1", T0 - 5, 0.3), raised("pump-1", T0)])
    wait_for(lambda: watcher.states() == [("pump-1", FIRING)], timeout=10)
    first = watcher.seen[0]
    assert first.device_name == "edge-1" and first.fault == "anomaly"
    assert [s.sensor for s in first.top_sensors] == ["flow", "current"]

    # The agent restarts; meanwhile the episode goes on (a higher peak) and pump-2 raises.
    site.disconnect()
    site.outbox.append([raised("pump-1", T0 + 30, score=2.6), raised("pump-2", T0 + 31)])
    site.connect()
    wait_for(lambda: len(watcher.seen) == 3, timeout=10)
    assert watcher.states()[1:] == [("pump-1", FIRING), ("pump-2", FIRING)]
    assert watcher.seen[1].id == first.id and watcher.seen[1].peak_score == pytest.approx(2.6)
    assert watcher.seen[1].top_sensors[0].sensor == "vibration"

    # The control plane restarts: the watch stream resumes after the last revision it saw.
    site.restart_plane()
    site.outbox.append([cleared("pump-1", T0 + 90)])
    wait_for(lambda: len(watcher.seen) == 4, timeout=20)
    # Nobody acknowledged it: returned to normal, unacknowledged (ISA-18.2).
    assert watcher.states()[3] == ("pump-1", RETURNED)
    assert watcher.seen[3].resolved_by == "edge"
    assert not watcher.error

    # Every path agrees: two alerts, one per episode, nothing twice.
    listed = site.alerts()
    assert sorted((a.asset, a.state) for a in listed) == [("pump-1", RETURNED), ("pump-2", FIRING)]
    assert len({a.revision for a in watcher.seen}) == len(watcher.seen)  # no change twice
    firing = site.alerts(state=FIRING)
    assert [a.asset for a in firing] == ["pump-2"]
    client.close()


def test_ack_resolve_and_notes_with_who_did_it(site: Site, tmp_path: Path) -> None:
    site.outbox.append([raised("pump-1", T0)])
    wait_for(lambda: len(site.alerts()) == 1)
    (alert,) = site.alerts()
    with site.plane.client() as client:
        acked = client.alert_action("ack", alert.id, "checking the bearing")
        assert acked.state == ACKED and acked.notes[0].endswith("admin: checking the bearing")
        done = client.alert_action("resolve", alert.id, "bearing replaced")
        assert done.state == RESOLVED and done.resolved_by == "admin"
        with pytest.raises(Exception, match="resolved"):
            client.alert_action("ack", alert.id)
    # The edge clears later: changes nothing; a new raise opens a new alert.
    site.outbox.append([cleared("pump-1", T0 + 60), raised("pump-1", T0 + 120)])
    wait_for(lambda: len(site.alerts()) == 2)
    assert site.alerts(state=RESOLVED)[0].resolved_by == "admin"


def test_alerts_and_predictions_from_the_cli(site: Site, tmp_path: Path) -> None:
    site.outbox.append(
        [prediction("pump-1", T0 + i, 0.2 + 0.1 * i) for i in range(12)]
        + [raised("pump-1", T0 + 12, score=1.3)]
    )
    wait_for(lambda: len(site.alerts()) == 1)
    autoglm(
        tmp_path,
        "login",
        "--server",
        site.plane.api_address,
        "--ca-cert",
        str(site.root / "cloud" / "ca.crt"),
        "--token",
        site.plane.token,
    )
    listed = json.loads(autoglm(tmp_path, "alerts", "list", "--state", "firing", "--json").stdout)
    assert [a["asset"] for a in listed] == ["pump-1"]
    table = autoglm(tmp_path, "alerts", "list").stdout
    assert "edge-1" in table and "firing" in table and "flow" in table and "minor" in table
    shown = autoglm(tmp_path, "alerts", "show", listed[0]["id"]).stdout
    assert "score timeline (12 windows" in shown and "top sensors: flow" in shown
    acked = autoglm(tmp_path, "alerts", "ack", listed[0]["id"], "--note", "on it").stdout
    assert "acknowledged" in acked
    judged = autoglm(
        tmp_path, "alerts", "resolve", listed[0]["id"][:8], "--verdict", "false"
    ).stdout
    assert "resolved, verdict false" in judged, judged
    false_alarms = autoglm(tmp_path, "alerts", "list", "--verdict", "false", "--json").stdout
    assert [a["verdict"] for a in json.loads(false_alarms)] == ["false"]
    assert (
        json.loads(autoglm(tmp_path, "alerts", "list", "--verdict", "none", "--json").stdout) == []
    )
    shown = autoglm(tmp_path, "alerts", "show", listed[0]["id"]).stdout
    assert "verdict: false" in shown and "severity minor" in shown, shown
    csv_out = autoglm(tmp_path, "device", "predictions", "edge-1", "--csv").stdout.splitlines()
    assert csv_out[0].startswith("window_start,window_end,asset,score,anomalous")
    assert len(csv_out) == 13
    as_json = json.loads(
        autoglm(tmp_path, "device", "predictions", "edge-1", "--asset", "pump-1", "--json").stdout
    )
    assert len(as_json) == 12
    added = json.loads(
        autoglm(tmp_path, "webhook", "add", "http://127.0.0.1:9/hook", "--json").stdout
    )
    hook_id = added["id"]
    assert added["secret"].startswith("whsec_") and added["kind"] == "standard"
    assert hook_id[:8] in autoglm(tmp_path, "webhook", "list").stdout
    rotated = autoglm(tmp_path, "webhook", "rotate-secret", hook_id[:8], "--overlap", "1h").stdout
    assert "the previous one too until" in rotated and "whsec_" in rotated
    autoglm(tmp_path, "webhook", "remove", hook_id)
    window = autoglm(
        tmp_path, "maintenance", "add", "--selector", "site=a", "--to", "2h", "--reason", "seals"
    ).stdout
    assert "maintenance " in window and " to " in window, window
    assert "seals" in autoglm(tmp_path, "maintenance", "list").stdout
    autoglm(tmp_path, "maintenance", "remove", window.split()[1].rstrip(":")[:8])
    assert "seals" not in autoglm(tmp_path, "maintenance", "list").stdout
    for args, message in (
        (["alerts", "list", "--since", "soon"], "--since"),
        (["alerts", "list", "--state", "burning"], "invalid choice"),
        (["alerts", "show", "no-such-alert"], "no alert"),
        (["device", "predictions", "no-such-device"], "no device"),
        (["device", "predictions", "edge-1", "--limit", "0"], "--limit"),
        (["webhook", "add", "http://127.0.0.1:9/x", "--secret", "x" * 20], "whsec_"),
        (["webhook", "add", "--kind", "pagerduty", "--secret", "short"], "routing key"),
        (["webhook", "add", "--kind", "alertmanager"], "needs the URL"),
        (["webhook", "add", "gopher://x/"], "scheme"),
        (["webhook", "add", "http://h/", "--filter", "a=b"], "unknown key"),
        (["webhook", "remove", "no-such-hook"], "no webhook"),
        (["webhook", "rotate-secret", "no-such-hook"], "no webhook"),
        (["alerts", "shelve", listed[0]["id"], "--for", "8h"], "--reason"),
        (["alerts", "shelve", listed[0]["id"], "--for", "soon", "--reason", "x"], "--for"),
        (["alerts", "shelve", listed[0]["id"], "--for", "30d", "--reason", "x"], "at most"),
        (["alerts", "resolve", listed[0]["id"], "--verdict", "maybe"], "invalid choice"),
        (["maintenance", "add", "--selector", "site=a"], "--reason"),
        (["maintenance", "add", "--selector", "", "--reason", "x"], "--selector"),
        (["maintenance", "add", "--selector", "site=a", "--to", "-1h", "--reason", "x"], "--to"),
        (["maintenance", "add", "--selector", "a=(", "--reason", "x"], "selector"),
        (["maintenance", "remove", "no-such-window"], "no maintenance window"),
    ):
        result = autoglm(tmp_path, *args, check=False)
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_watch_streams_per_operator_are_capped_with_resource_exhausted(
    plane: RunningPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    import grpc

    from cloud.service import operator_alerts

    monkeypatch.setattr(operator_alerts, "MAX_WATCHES_PER_OPERATOR", 2)
    with plane.client() as admin:
        viewer = admin.add_operator("viewer-1", "viewer").token
    with plane.client() as client, plane.client(token=viewer) as other:

        def open_stream(c: OperatorClient) -> Any:
            call = c._stub.WatchAlerts(operator_pb2.WatchAlertsRequest(), metadata=c._metadata)
            assert not next(call).id  # the stream's marker: it is open
            return call

        held = [open_stream(client), open_stream(client)]
        with pytest.raises(RateLimited, match=r"admin has 2 alert watch streams open.*MAX_WATCHES"):
            next(iter(client.watch_alerts(operator_pb2.WatchAlertsRequest(), resume=False)))
        with pytest.raises(grpc.RpcError) as refused:
            open_stream(client)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        held.append(open_stream(other))  # another operator is not affected
        held.pop(0).cancel()
        wait_for(lambda: plane.plane.alerts.watchers <= 2, timeout=10)
        held.append(open_stream(client))  # a closed stream frees its place
        for call in held:
            call.cancel()
