"""Alerts end to end over the agent's real sync path (outbox → session → store) and the
operator API: grouped, once per episode, through watch streams and lists, with the agent
and the control plane restarted in between; the CLI on top."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cloud.client import OperatorClient
from edge_agent.decisions import AlertEvent
from edge_agent.identity import DeviceIdentity
from edge_agent.outbox import ALERT, PREDICTION, Outbox
from edge_agent.runtime import alert_record
from edge_agent.sync import RecordSync
from protos.autoglm.v1 import agent_pb2, operator_pb2
from tests.conftest import register
from tests.support.agents import SessionThread, enroll_identity, start_session, wait_for
from tests.support.cloud import RunningPlane, init_plane, start_plane
from tests.test_cli_e2e import autoglm

pytestmark = pytest.mark.integration
FIRING = operator_pb2.Alert.STATE_FIRING
ACKED = operator_pb2.Alert.STATE_ACKNOWLEDGED
RESOLVED = operator_pb2.Alert.STATE_RESOLVED
T0 = 1_790_000_000.0  # 2026-09-21, seconds since the epoch


def raised(asset: str, at: float, score: float = 1.4, key: str = "") -> tuple[int, bytes]:
    return ALERT, _event("raised", asset, at, score, key)


def cleared(asset: str, at: float, key: str = "") -> tuple[int, bytes]:
    return ALERT, _event("cleared", asset, at, 0.4, key)


def _event(kind: str, asset: str, at: float, score: float, key: str) -> bytes:
    top = (("vibration", 0.8), ("flow", 0.3)) if score > 2 else (("flow", 0.7), ("current", 0.2))
    return alert_record(
        AlertEvent(
            kind=kind,
            key=key or f"{asset}:anomaly:{int(at)}",
            asset=asset,
            score=score,
            top_sensors=top,
            window_start=at - 24,
            window_end=at,
            raised_at=at,
            model_version="3",
        )
    )


def prediction(asset: str, at: float, score: float) -> tuple[int, bytes]:
    record = agent_pb2.Record(
        prediction=agent_pb2.Prediction(
            asset=asset,
            score=score,
            anomalous=score >= 1.0,
            model_version="3",
            contributions={"flow": 0.6, "vibration": 0.1},
        )
    )
    record.prediction.window_start.FromNanoseconds(int((at - 24) * 1e9))
    record.prediction.window_end.FromNanoseconds(int(at * 1e9))
    return PREDICTION, record.SerializeToString()


@dataclass
class Watcher:
    """`OperatorClient.watch_alerts` in a thread, as `autoglm alerts watch` runs it."""

    client: OperatorClient
    seen: list[operator_pb2.Alert] = field(default_factory=list)
    error: list[BaseException] = field(default_factory=list)

    def start(self) -> Watcher:
        def run() -> None:
            try:
                # From the first revision on, so the test need not race the stream's start.
                request = operator_pb2.WatchAlertsRequest(after_revision=0)
                for alert in self.client.watch_alerts(request):
                    self.seen.append(alert)
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.error.append(exc)

        threading.Thread(target=run, daemon=True).start()
        return self

    def states(self) -> list[tuple[str, int]]:
        return [(a.asset, a.state) for a in self.seen]


@dataclass
class Site:
    plane: RunningPlane
    identity: DeviceIdentity
    outbox: Outbox
    root: Path
    session: SessionThread | None = None

    def connect(self) -> None:
        self.session = start_session(self.identity, sync=RecordSync(self.outbox, 100, 4))
        wait_for(lambda: self.session is not None and self.session.session.connected)

    def disconnect(self) -> None:
        assert self.session is not None
        self.session.stop()
        self.session = None

    def restart_plane(self) -> None:
        port = self.plane.plane.device_port
        api = self.plane.plane.api_port
        self.plane.stop()
        self.plane = start_plane(
            self.root / "cloud",
            self.plane.token,
            device_listen=f"127.0.0.1:{port}",
            api_listen=f"127.0.0.1:{api}",
        )

    def alerts(self, **kw: object) -> list[operator_pb2.Alert]:
        with self.plane.client() as client:
            return client.list_alerts(operator_pb2.ListAlertsRequest(**kw))  # type: ignore[arg-type]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    cloud = tmp_path / "cloud"
    plane = start_plane(cloud, init_plane(cloud).operator_token)
    identity = enroll_identity(register(plane, "edge-1", site="a"), tmp_path / "edge")
    s = Site(plane, identity, Outbox(tmp_path / "edge" / "outbox.sqlite3", 1 << 22), tmp_path)
    s.connect()
    yield s
    if s.session is not None:
        s.disconnect()
    s.outbox.close()
    s.plane.stop()


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
    assert watcher.states()[3] == ("pump-1", RESOLVED)
    assert watcher.seen[3].resolved_by == "edge"
    assert not watcher.error

    # Every path agrees: two alerts, one per episode, nothing twice.
    listed = site.alerts()
    assert sorted((a.asset, a.state) for a in listed) == [("pump-1", RESOLVED), ("pump-2", FIRING)]
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
    assert "edge-1" in table and "firing" in table and "flow" in table
    shown = autoglm(tmp_path, "alerts", "show", listed[0]["id"]).stdout
    assert "score timeline (12 windows" in shown and "top sensors: flow" in shown
    acked = autoglm(tmp_path, "alerts", "ack", listed[0]["id"], "--note", "on it").stdout
    assert "acknowledged" in acked
    csv_out = autoglm(tmp_path, "device", "predictions", "edge-1", "--csv").stdout.splitlines()
    assert csv_out[0].startswith("window_start,window_end,asset,score,anomalous")
    assert len(csv_out) == 13
    as_json = json.loads(
        autoglm(tmp_path, "device", "predictions", "edge-1", "--asset", "pump-1", "--json").stdout
    )
    assert len(as_json) == 12
    for args, message in (
        (["alerts", "list", "--since", "soon"], "--since"),
        (["alerts", "list", "--state", "burning"], "invalid choice"),
        (["alerts", "show", "no-such-alert"], "no alert"),
        (["device", "predictions", "no-such-device"], "no device"),
        (["device", "predictions", "edge-1", "--limit", "0"], "--limit"),
    ):
        result = autoglm(tmp_path, *args, check=False)
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
