"""Alert events on site: the agent's MQTT alert and retained state topics and the SCADA
links (Sparkplug, OPC UA), with raises that a maintenance period covers held back (stored
and synced all the same) and published when the period ends with the fault still open."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import orjson

from edge_agent.decisions import AlertEvent
from edge_agent.logs import ids
from edge_agent.maintenance import SiteMaintenance
from edge_agent.open_alerts import OpenAlerts

log = logging.getLogger(__name__)


class AlertCounters(Protocol):
    alerts_raised: int
    alerts_cleared: int
    alerts_held_back: int


class SiteAlerts:
    def __init__(
        self,
        device: str,
        prefix: str,
        maintenance: SiteMaintenance,
        open_alerts: OpenAlerts,
        counters: AlertCounters,
        publish: Callable[[str, bytes, bool], None],  # (topic, payload, retain), QoS 1
        to_scada: Callable[[AlertEvent], None],
        state_known: Callable[[], bool] = lambda: True,  # the outbox's open alerts are current
    ) -> None:
        self.device = device
        self.prefix = prefix
        self.maintenance = maintenance
        self.open_alerts = open_alerts
        self.counters = counters
        self._publish = publish
        self._to_scada = to_scada
        self._state_known = state_known
        self.held: dict[str, AlertEvent] = {}  # by asset: raises a period kept off the site
        # By asset: its retained state to publish again (its open alert, None: normal), see
        # `restore_state`.
        self._restoring: dict[str, AlertEvent | None] = {}

    def announce(self, event: AlertEvent) -> None:
        """Publishes an alert event on site, unless a maintenance period covers the raise."""
        if event.kind == "raised":
            period = self.maintenance.covering(event.asset, event.window_end)
            if period is not None:
                self.counters.alerts_held_back += 1
                self.held[event.asset] = event
                self._mark_held(event.asset)
                log.info("fault on %s not published on site: maintenance %s (%s)",
                         event.asset, period.id[:8], period.reason)  # fmt: skip
                return
        else:
            self.open_alerts.release(event.asset)  # its held mark, if any, goes with it
            if self.held.pop(event.asset, None) is not None:
                return  # raised and cleared within maintenance: the site never saw it
        self.publish(event)

    def _mark_held(self, asset: str) -> None:
        """Kept for a restart (the open alert itself is kept by the outbox)."""
        self.open_alerts.hold(asset)

    def release_held(self, asset: str, at: float) -> None:
        """A fault still open when its maintenance period ended is published then."""
        held = self.held.get(asset)
        if held is not None and self.maintenance.covering(asset, at) is None:
            del self.held[asset]
            self.open_alerts.release(asset)
            self.publish(held)

    def restore_state(self, asset: str, open_alert: AlertEvent | None) -> None:
        """The retained state of `asset` is published again (`publish_restored`) as the outbox
        keeps it: `open_alert` raised, or normal. A kill after the outbox kept an alert event
        and before the site was told left that topic behind; the alerts topic is not
        published again (its listeners would take it for a new event), nor is the state of
        a raise a maintenance period holds back (published when the period ends)."""
        if asset not in self.held:
            self._restoring[asset] = open_alert

    def publish_restored(self) -> None:
        """Publishes the retained states `restore_state` asked for (once MQTT can take them:
        at start, then on the sink thread before the alert events it publishes)."""
        restoring, self._restoring = self._restoring, {}
        if restoring and not self._state_known():
            # The outbox takes nothing now (degraded): events went to the site but not to its
            # open alerts, so what it keeps may be older than what the site was told.
            log.info("retained states not published again: the outbox's open alerts may be old")
            return
        for asset, open_alert in restoring.items():
            if asset in self.held:  # held since it was asked: the period decides
                continue
            self._publish(self._state_topic(asset), self.state_payload(asset, open_alert), True)
            log.info("retained state of %s published again: %s", asset,
                     f"alert {open_alert.key} open" if open_alert else "normal")  # fmt: skip

    def _state_topic(self, asset: str) -> str:
        return f"{self.prefix}/state/{self.device}/{asset}"

    def state_payload(self, asset: str, event: AlertEvent | None) -> bytes:
        """The retained state of `asset` after `event`, the last alert event published on it.
        None: no alert open and its last event not known (as at a start after a kill), so
        normal with nothing said of that event."""
        if event is None:
            state: dict[str, object] = {
                "device": self.device,
                "asset": asset,
                "state": "normal",
                "since": None,
                "alert_key": None,
                "score": None,
                "top_sensors": [],
                "model_version": None,
            }
        else:
            state = {
                "device": self.device,
                "asset": event.asset,
                "state": "fault" if event.kind == "raised" else "normal",
                "since": event.window_end,
                "alert_key": event.key,
                "score": round(event.score, 4),
                "top_sensors": [s for s, _ in event.top_sensors],
                "model_version": event.model_version,
            }
        return orjson.dumps(state)

    def publish(self, event: AlertEvent) -> None:
        raised = event.kind == "raised"
        if raised:
            self.counters.alerts_raised += 1
        else:
            self.counters.alerts_cleared += 1
        doc = {"device": self.device} | event.to_json()
        self._publish(f"{self.prefix}/alerts/{self.device}/{event.asset}", orjson.dumps(doc), False)
        self._restoring.pop(event.asset, None)  # this event's state is newer
        state = self.state_payload(event.asset, event)
        self._publish(self._state_topic(event.asset), state, True)
        self._to_scada(event)
        log.warning(
            "%s on %s: score %.2f, top sensors %s",
            "FAULT" if raised else "cleared",
            event.asset,
            event.score,
            ", ".join(s for s, _ in event.top_sensors),
            extra=ids(asset=event.asset, alert=event.key, model_version=event.model_version),
        )
