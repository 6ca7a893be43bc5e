"""Maintenance periods on the agent: a raise inside one is stored for the cloud but not
published on site, published when the period ends while the fault runs on; a raise and clear
both inside it never reach the site; the periods survive a restart (held offline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from edge_agent.decisions import CLEARED, RAISED, AlertEvent
from edge_agent.maintenance import SiteMaintenance
from edge_agent.outbox import ALERT
from protos.autoglm.v1 import agent_pb2
from tests.support.bundles import train_small
from tests.support.datapath import START, Site, pump, site_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _periods(*spans: tuple[str, float, float | None]) -> agent_pb2.Maintenance:
    message = agent_pb2.Maintenance()
    for asset, start, end in spans:
        period = message.periods.add(id=f"window-{asset}-{start}", asset=asset, reason="seals")
        period.starts_at.FromNanoseconds(int(start * 1e9))
        if end is not None:
            period.ends_at.FromNanoseconds(int(end * 1e9))
    return message


def _record_site(site: Site) -> list[tuple[str, dict[str, Any]]]:
    published: list[tuple[str, dict[str, Any]]] = []

    def publish(topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        published.append((topic, orjson.loads(payload)))

    site.runtime.mqtt.publish = publish  # type: ignore[method-assign]
    return published


def test_maintenance_holds_site_alerts_back_and_lifts_on_time(tmp_path: Path) -> None:
    bundle, key = train_small(tmp_path / "model")
    config = site_config(tmp_path, bundle, decisions={"clear_at": 0.95})
    site = Site(config, bundle, key.public_key(), tmp_path / "1")
    published = _record_site(site)
    site.runtime.maintenance.replace(_periods(("pump-1", START, START + 350)))
    site.feed(pump(200, faulty=False, seed=1), 0)
    site.feed(pump(150, faulty=True, seed=2), 200)
    assert [e.kind for e in site.events()] == [RAISED]
    # The site hears only the normal state published at the first calibration (as the
    # outbox keeps it: no alert open), not the raise the period holds back.
    assert [(t, d["state"]) for t, d in published] == [("autoglm/state/t/pump-1", "normal")]
    assert site.runtime.counters.alerts_held_back == 1
    # Stored for the cloud all the same.
    assert [kind for _, kind, _ in site.outbox.pending(0, 10_000) if kind == ALERT] == [ALERT]
    site.stop()  # killed inside the period, the fault still open and unpublished

    # Restarted: the periods and the held-back raise come from disk (no session needed).
    assert [p.asset for p in SiteMaintenance(config.state_dir).periods] == ["pump-1"]
    again = Site(config, bundle, key.public_key(), tmp_path / "2")
    published = _record_site(again)
    # The period ends (by the data's clock) with the fault still running: published then.
    again.feed(pump(60, faulty=True, seed=3), 350)
    topics = [t for t, _ in published]
    assert topics == ["autoglm/alerts/t/pump-1", "autoglm/state/t/pump-1"], topics
    assert published[1][1]["state"] == "fault" and again.events() == []
    # A clear whose raise was published is published too, inside a period or not.
    again.runtime.maintenance.replace(_periods(("", START, None)))  # out of service
    again.feed(pump(200, faulty=False, seed=4), 410)
    assert [e.kind for e in again.events()] == [CLEARED]
    assert [d["state"] for t, d in published if "/state/" in t] == ["fault", "normal"]
    # A raise and its clear inside a period: the site never hears of either.
    published.clear()
    at = START + 724
    for kind in ("raised", "cleared"):
        event = AlertEvent(kind, "k1", "pump-1", 1.5, (("flow", 1.0),), at - 24, at, at, "1")
        again.runtime.site.announce(event)
    assert published == [] and again.runtime.site.held == {}
    again.stop()


def test_unreadable_periods_on_disk_hold_nothing_back(tmp_path: Path) -> None:
    (tmp_path / "maintenance.json").write_text("{not json")
    assert SiteMaintenance(tmp_path).periods == ()
    kept = SiteMaintenance(tmp_path)
    kept.replace(_periods(("pump-1", 0, 10)))
    assert SiteMaintenance(tmp_path).covering("pump-1", 5) is not None
    assert SiteMaintenance(tmp_path).covering("pump-1", 10) is None
    assert SiteMaintenance(tmp_path).covering("pump-2", 5) is None
