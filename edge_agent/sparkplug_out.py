"""Alerts back to SCADA over Sparkplug B: the agent is an edge node (`sparkplug_out.edge_node`
in `sparkplug_out.group`) with one device per asset, whose metrics an HMI or historian reads
like any PLC tag:

    autoglm/fault        Boolean  an alert is open on the asset
    autoglm/score        Double   the window score that raised or cleared it (1.0 = threshold)
    autoglm/top_sensors  String   the sensors that moved most, strongest first
    autoglm/alert_key    String   the alert's key (the same on its raise and its clear)

NBIRTH (with `bdSeq` and `Node Control/Rebirth`) and a DBIRTH per asset are published on
every connection, DDATA on every raise and clear, NDEATH is the MQTT will; a
`Node Control/Rebirth` command publishes the births again: at once, then at most once per
`REBIRTH_MIN_S` (later commands within it are answered by one birth when it ends, from a
timer thread, so a flood of commands costs the network thread nothing). `bdSeq` grows by
one per agent start (kept in the state directory), so a host can tell this session's death
from an older one's.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from google.protobuf.message import DecodeError

from edge_agent.decisions import RAISED, AlertEvent
from edge_agent.files import replace_atomically
from edge_agent.ingest.sparkplug import (
    BOOLEAN,
    DOUBLE,
    INT64,
    NAMESPACE,
    REBIRTH_METRIC,
)
from protos.sparkplug import sparkplug_b_pb2 as spb

log = logging.getLogger(__name__)
STRING = 12
FAULT, SCORE, TOP, KEY = (
    "autoglm/fault",
    "autoglm/score",
    "autoglm/top_sensors",
    "autoglm/alert_key",
)
_ALIASES = {FAULT: 1, SCORE: 2, TOP: 3, KEY: 4}
REBIRTH_MIN_S = 1.0  # between two births answering commands (one birth is 1 + assets messages)
LOG_EVERY_S = 60.0


def _after(delay: float, action: Callable[[], None]) -> None:
    """Runs `action` in a daemon thread `delay` seconds from now."""
    timer = threading.Timer(delay, action)
    timer.daemon = True
    timer.name = "sparkplug rebirth"
    timer.start()


class SparkplugAlerts:
    def __init__(
        self,
        group: str,
        edge_node: str,
        assets: Sequence[str],
        state_dir: Path,
        publish: Callable[[str, bytes], None],
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        schedule: Callable[[float, Callable[[], None]], None] = _after,
    ) -> None:
        self.group = group
        self.edge_node = edge_node
        self.assets = list(assets)
        self.publish = publish
        self.clock = clock
        self.bd_seq = _next_bd_seq(state_dir / "sparkplug_bdseq")
        self._seq = 0
        self._lock = threading.Lock()  # births (network thread) and alerts (pipeline thread)
        self._current: dict[str, AlertEvent] = {}  # the last event per asset, for rebirths
        self.bad_commands = 0
        self._warned_at = -math.inf
        self._monotonic = monotonic
        self._schedule = schedule
        self._born_at = -math.inf  # monotonic time of the last birth
        self._rebirth_pending = False  # a command came within REBIRTH_MIN_S of it
        self.rebirths_asked = 0
        self._asked_logged_at = -math.inf
        self._asked_unlogged = 0

    def _topic(self, kind: str, device: str = "") -> str:
        base = f"{NAMESPACE}/{self.group}/{kind}/{self.edge_node}"
        return f"{base}/{device}" if device else base

    @property
    def command_topic(self) -> str:
        return self._topic("NCMD")

    def will(self) -> tuple[str, bytes]:
        """The NDEATH to leave with the broker as the MQTT will."""
        death = spb.Payload(timestamp=self._now())
        death.metrics.add(name="bdSeq", datatype=INT64, long_value=self.bd_seq)
        return self._topic("NDEATH"), death.SerializeToString()

    def _now(self) -> int:
        return int(self.clock() * 1000)

    def _next(self, message: spb.Payload) -> bytes:
        message.seq = self._seq
        self._seq = (self._seq + 1) % 256
        return message.SerializeToString()

    def birth(self) -> None:
        """NBIRTH and a DBIRTH per asset (on connect, and when a host asks for a rebirth)."""
        with self._lock:
            self._born_at = self._monotonic()
            self._rebirth_pending = False  # answered by this one
            self._seq = 0
            now = self._now()
            node = spb.Payload(timestamp=now)
            node.metrics.add(name="bdSeq", datatype=INT64, long_value=self.bd_seq, timestamp=now)
            node.metrics.add(name=REBIRTH_METRIC, datatype=BOOLEAN, boolean_value=False,
                             timestamp=now)  # fmt: skip
            self.publish(self._topic("NBIRTH"), self._next(node))
            for asset in self.assets:
                device = spb.Payload(timestamp=now)
                self._fill(device, self._current.get(asset), now)
                self.publish(self._topic("DBIRTH", asset), self._next(device))

    def alert(self, event: AlertEvent) -> None:
        """DDATA of the asset's alert metrics after a raise or clear."""
        if event.asset not in self.assets:
            return
        with self._lock:
            self._current[event.asset] = event
            now = self._now()
            data = spb.Payload(timestamp=now)
            self._fill(data, event, int(event.window_end * 1000))
            self.publish(self._topic("DDATA", event.asset), self._next(data))

    def restore(self, open_alerts: Sequence[AlertEvent]) -> None:
        """Alerts open (and published) when the agent started: births carry them."""
        with self._lock:
            for event in open_alerts:
                self._current[event.asset] = event

    def on_command(self, payload: bytes) -> None:
        command = spb.Payload()
        try:
            command.ParseFromString(payload)
        except (DecodeError, ValueError):
            self.bad_commands += 1
            now = time.monotonic()
            if now - self._warned_at >= 60.0:
                self._warned_at = now
                log.warning("sparkplug: unreadable command(s) on %s ignored (%d so far)",
                            self.command_topic, self.bad_commands)  # fmt: skip
            return
        if any(m.name == REBIRTH_METRIC and m.boolean_value for m in command.metrics):
            self._rebirth_asked()

    def _rebirth_asked(self) -> None:
        now = self._monotonic()
        self.rebirths_asked += 1
        self._asked_unlogged += 1
        if now - self._asked_logged_at >= LOG_EVERY_S:
            log.info("sparkplug: a host asked for a rebirth (%d request(s) since the last such "
                     "line; births at most once per %.0f s)", self._asked_unlogged,
                     REBIRTH_MIN_S)  # fmt: skip
            self._asked_logged_at, self._asked_unlogged = now, 0
        with self._lock:
            wait = self._born_at + REBIRTH_MIN_S - now
            if wait > 0:  # born a moment ago: one more birth when the interval ends
                if not self._rebirth_pending:
                    self._rebirth_pending = True
                    self._schedule(wait, self._pending_birth)
                return
        self.birth()

    def _pending_birth(self) -> None:
        """The birth owed to commands that came too soon after the last (timer thread)."""
        with self._lock:
            if not self._rebirth_pending:
                return  # a birth since (a reconnection) answered them
        try:
            self.birth()
        except Exception:  # a thread of its own: said, not lost silently
            log.exception("sparkplug: the rebirth asked for could not be published")

    @staticmethod
    def _fill(message: spb.Payload, event: AlertEvent | None, at: int) -> None:
        raised = event is not None and event.kind == RAISED
        values: dict[str, bool | float | str] = {
            FAULT: raised,
            SCORE: float(event.score) if event else 0.0,
            TOP: ",".join(s for s, _ in event.top_sensors) if event else "",
            KEY: event.key if event else "",
        }
        for name, value in values.items():
            # Named and typed in data too (hosts that read no births still understand it).
            metric = message.metrics.add(alias=_ALIASES[name], timestamp=at, name=name)
            metric.datatype = {FAULT: BOOLEAN, SCORE: DOUBLE}.get(name, STRING)
            if isinstance(value, bool):
                metric.boolean_value = value
            elif isinstance(value, float):
                metric.double_value = value
            else:
                metric.string_value = str(value)


def _next_bd_seq(path: Path) -> int:
    """0-255, one more than the last start's (kept in `path`)."""
    try:
        last = int(path.read_text().strip())
    except (OSError, ValueError):
        last = -1
    current = (last + 1) % 256
    try:
        replace_atomically(path, str(current).encode(), 0o644)
    except OSError as exc:
        log.warning("sparkplug: cannot keep bdSeq in %s: %s", path, exc)
    return current
