"""The retained state topic of each asset is published again at start as the outbox keeps its
open alert: a kill after the outbox kept an alert event and before the site was told no longer
leaves the site's retained state behind (raised or cleared), and the alerts topic is not
published again (its listeners would hear a new event)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest

from edge_agent.decisions import CLEARED, RAISED, AlertEvent
from edge_agent.ingest.mqtt import MqttConnection
from edge_agent.maintenance import SiteMaintenance
from edge_agent.open_alerts import OpenAlerts
from edge_agent.site_alerts import SiteAlerts
from tests.support.bundles import train_small
from tests.support.datapath import START, Site, pump, site_config

STATE = "autoglm/state/t/pump-1"
Published = list[tuple[str, bytes, bool]]


def _site_alerts(tmp_path: Path, published: Published, known: bool = True) -> SiteAlerts:
    counters = SimpleNamespace(alerts_raised=0, alerts_cleared=0, alerts_held_back=0)
    return SiteAlerts(
        "t",
        "autoglm",
        SiteMaintenance(tmp_path),
        OpenAlerts(tmp_path / "alerts"),
        counters,
        lambda topic, payload, retain: published.append((topic, payload, retain)),
        lambda _event: None,
        lambda: known,
    )


def _event(kind: str) -> AlertEvent:
    at = START + 100
    return AlertEvent(kind, "k1", "pump-1", 1.5, (("flow", 1.0),), at - 24, at, at, "1")


@pytest.mark.unit
def test_the_state_published_again_is_the_one_the_event_published(tmp_path: Path) -> None:
    published: Published = []
    site = _site_alerts(tmp_path, published)
    site.publish(_event(RAISED))
    heard = [p for p in published if p[0] == STATE]
    published.clear()
    site.restore_state("pump-1", _event(RAISED))
    site.publish_restored()
    assert published == heard, (published, heard)
    published.clear()
    site.publish_restored()  # asked once, published once
    assert published == []
    # Not open: normal, with nothing said of the event not known.
    site.restore_state("pump-1", None)
    site.publish_restored()
    ((topic, payload, retain),) = published
    assert (topic, retain) == (STATE, True)
    assert orjson.loads(payload) | {"since": 0} == {
        "device": "t",
        "asset": "pump-1",
        "state": "normal",
        "since": 0,
        "alert_key": None,
        "score": None,
        "top_sensors": [],
        "model_version": None,
    }
    # A raise a maintenance period holds back: the period decides what the site sees.
    published.clear()
    site.held["pump-1"] = _event(RAISED)
    site.restore_state("pump-1", _event(RAISED))
    site.publish_restored()
    assert published == []


@pytest.mark.unit
def test_nothing_is_published_again_while_the_outbox_takes_nothing(tmp_path: Path) -> None:
    """A degraded outbox (full or read-only disk) kept none of the events the site was told
    since: publishing its open alerts again could show a fault cleared, or normal over one."""
    published: Published = []
    site = _site_alerts(tmp_path, published, known=False)
    site.restore_state("pump-1", None)
    site.restore_state("pump-2", _event(RAISED))
    site.publish_restored()
    assert published == []


@pytest.mark.integration
@pytest.mark.slow
def test_a_kill_between_the_outbox_write_and_the_site_is_made_good_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle, key = train_small(tmp_path / "model")
    config = site_config(tmp_path, bundle, decisions={"clear_at": 0.95})
    published: Published = []

    def publish(
        _self: MqttConnection, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> None:
        published.append((topic, payload, retain))

    monkeypatch.setattr(MqttConnection, "publish", publish)

    def killed_before_the_site_heard(_event: AlertEvent) -> None:
        """The outbox kept the event; the agent died before publishing it."""

    first = Site(config, bundle, key.public_key(), tmp_path / "1")
    first.runtime.site.publish = killed_before_the_site_heard  # type: ignore[method-assign]
    first.feed(pump(200, faulty=False, seed=1), 0)
    first.feed(pump(150, faulty=True, seed=2), 200)
    (raised,) = first.events()
    assert raised.kind == RAISED
    first.stop()

    published.clear()
    second = Site(config, bundle, key.public_key(), tmp_path / "2")
    # At start: the retained state shows the open alert, as its raise would have; nothing
    # on the alerts topic.
    expected = second.runtime.site.state_payload("pump-1", raised)
    assert published == [(STATE, expected, True)], published
    assert orjson.loads(expected)["state"] == "fault"
    assert orjson.loads(expected)["alert_key"] == raised.key

    second.runtime.site.publish = killed_before_the_site_heard  # type: ignore[method-assign]
    second.feed(pump(200, faulty=False, seed=4), 350)
    (cleared,) = second.events()
    assert (cleared.kind, cleared.key) == (CLEARED, raised.key)
    second.stop()

    published.clear()
    third = Site(config, bundle, key.public_key(), tmp_path / "3")
    try:
        ((topic, payload, retain),) = published
        assert (topic, retain) == (STATE, True), published
        assert orjson.loads(payload)["state"] == "normal", payload
    finally:
        third.stop()
