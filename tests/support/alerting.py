"""An edge site for alert tests: a device's real sync path (outbox → RecordSync →
CloudSession) feeding a control plane, with helpers to write edge alert events."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud.client import OperatorClient
from edge_agent.decisions import AlertEvent
from edge_agent.identity import DeviceIdentity
from edge_agent.outbox import ALERT, PREDICTION, Outbox
from edge_agent.sync import RecordSync
from edge_agent.wire import alert_record
from protos.autoglm.v1 import agent_pb2, operator_pb2
from tests.conftest import register
from tests.support.agents import SessionThread, enroll_identity, start_session, wait_for
from tests.support.cloud import RunningPlane, init_plane, start_plane

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
    overrides: dict[str, Any] = field(default_factory=dict)
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
            **self.overrides,
        )

    def alerts(self, **kw: object) -> list[operator_pb2.Alert]:
        with self.plane.client() as client:
            return client.list_alerts(operator_pb2.ListAlertsRequest(**kw))  # type: ignore[arg-type]


@contextmanager
def open_site(root: Path, database_url: str = "", **overrides: Any) -> Iterator[Site]:
    """A control plane (with config `overrides`) and one connected device, edge-1."""
    cloud = root / "cloud"
    plane = start_plane(cloud, init_plane(cloud, database_url).operator_token, **overrides)
    identity = enroll_identity(register(plane, "edge-1", site="a"), root / "edge")
    outbox = Outbox(root / "edge" / "outbox.sqlite3", 1 << 22)
    s = Site(plane, identity, outbox, root, overrides)
    s.connect()
    try:
        yield s
    finally:
        if s.session is not None:
            s.disconnect()
        s.outbox.close()
        s.plane.stop()
