"""Proto <-> domain round trips, and the presence tracker's coalescing and retry."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloud.domain import DesiredModel, DeviceRecord, DeviceState, PresenceUpdate
from cloud.presence import PresenceTracker
from cloud.service.serde import device_from_proto, device_to_proto
from cloud.store.sql import SqlStore

pytestmark = pytest.mark.unit

times = st.datetimes(
    min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2100, 1, 1), timezones=st.just(dt.UTC)
)
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)


@given(
    name=text.filter(bool),
    labels=st.dictionaries(text, text, max_size=4),
    state=st.sampled_from(list(DeviceState)),
    created=times,
    seen=st.none() | times,
    revoked=st.none() | times,
    online=st.booleans(),
    model_version=text,
)
def test_device_round_trip(
    name: str,
    labels: dict[str, str],
    state: DeviceState,
    created: dt.datetime,
    seen: dt.datetime | None,
    revoked: dt.datetime | None,
    online: bool,
    model_version: str,
) -> None:
    device = DeviceRecord(
        id="d-1",
        name=name,
        labels=labels,
        profile="orin",
        state=state,
        created_at=created,
        revoked_at=revoked,
        last_seen=seen,
        session_open=online,
        agent_version="0.1.0",
        status={"model_version": model_version} if model_version else {},
        host={"hostname": "h", "cpu_count": 2},
    )
    back = device_from_proto(device_to_proto(device, online))
    assert back == device


def test_a_device_names_its_desired_model_as_operators_write_versions() -> None:
    now = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    device = DeviceRecord(
        id="d-1", name="pump-1", labels={}, profile="", state=DeviceState.ACTIVE, created_at=now
    )

    def desired(name: str, version: str, shadow: bool = False, revert: str = "") -> str:
        model = DesiredModel(
            "d-1", name, version, "sha256:a", "sha256:b", "r-1", shadow, now, revert
        )
        return device_to_proto(device, False, model).desired_model_version

    assert desired("pump", "2") == "pump:2"
    assert desired("", "2") == "2"
    assert desired("", "") == ""
    assert desired("pump", "2", shadow=True) == "pump:2 (shadow)"
    # An aborted rollout's send-back applies only to a device serving the aborted version.
    assert desired("pump", "1", revert="2") == "pump:1 (if serving 2)"
    assert desired("", "", revert="2") == "- (if serving 2)"  # back to no version
    assert device_to_proto(device, False).desired_model_version == ""


class _RecordingStore(SqlStore):
    """The real SQLite store, recording each presence batch and failing one on request."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.failing = False
        self.batches: list[list[PresenceUpdate]] = []

    def record_presence(self, updates: Sequence[PresenceUpdate]) -> None:
        if self.failing:
            raise RuntimeError("database went away")
        self.batches.append(list(updates))
        super().record_presence(updates)


def test_presence_coalesces_and_survives_a_failed_flush(tmp_path: Path) -> None:
    store = _RecordingStore(f"sqlite:///{tmp_path / 'p.db'}")
    clock_now = [dt.datetime(2026, 1, 1, tzinfo=dt.UTC)]
    encoded: list[object] = []

    def encode(report: object) -> dict[str, object]:
        encoded.append(report)
        return {"n": report}

    tracker = PresenceTracker(store, clock=lambda: clock_now[0], encode=encode)
    tracker.seen("a", agent_version="1", status=0, host="h")
    for i in range(100):
        clock_now[0] += dt.timedelta(seconds=1)
        tracker.seen("a", status=i)
    tracker.seen("b")
    assert tracker.pending == 2
    assert encoded == []  # nothing is encoded per heartbeat
    store.failing = True  # every write fails: the store is down, not one row bad
    with pytest.raises(RuntimeError):
        tracker.flush()
    assert tracker.pending == 2  # kept for the next flush
    store.failing = False
    assert tracker.flush() == 2
    (batch,) = store.batches
    a = next(u for u in batch if u.device_id == "a")
    assert (a.status, a.host, a.agent_version) == ({"n": 99}, {"n": "h"}, "1")
    assert a.last_seen == clock_now[0] and a.session_open
    assert tracker.flush() == 0
    store.close()


def test_presence_close_keeps_the_last_report(tmp_path: Path) -> None:
    store = _RecordingStore(f"sqlite:///{tmp_path / 'p.db'}")
    tracker = PresenceTracker(store)
    tracker.seen("a", agent_version="1", host={"arch": "x"})
    tracker.seen("a", status={"model_version": "2"})
    tracker.closed("a")
    tracker.closed("b")
    tracker.flush()
    by_id = {u.device_id: u for u in store.batches[0]}
    a = by_id["a"]
    assert (a.agent_version, a.host, a.status) == ("1", {"arch": "x"}, {"model_version": "2"})
    assert a.session_open is False
    assert by_id["b"].session_open is False and by_id["b"].status is None
    store.close()
