"""The agent's own Sparkplug node under a flood of `Node Control/Rebirth` commands: the first
is answered at once, later ones within `REBIRTH_MIN_S` by one birth when it ends (never on
the network thread's time), and the log says so once a minute, not once a command."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_agent.ingest.sparkplug import BOOLEAN, REBIRTH_METRIC
from edge_agent.sparkplug_out import REBIRTH_MIN_S, SparkplugAlerts
from protos.sparkplug import sparkplug_b_pb2 as spb
from tests.support.agents import wait_for

ASSETS = [f"asset-{i}" for i in range(200)]


def _rebirth() -> bytes:
    command = spb.Payload()
    command.metrics.add(name=REBIRTH_METRIC, datatype=BOOLEAN, boolean_value=True)
    return command.SerializeToString()


class Published:
    def __init__(self) -> None:
        self.topics: list[str] = []

    def __call__(self, topic: str, _payload: bytes) -> None:
        self.topics.append(topic)

    @property
    def births(self) -> int:
        return sum(t.split("/")[2] == "NBIRTH" for t in self.topics)


def test_a_flood_of_rebirth_commands_is_answered_by_one_birth_per_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = [100.0]
    timers: list[tuple[float, Callable[[], None]]] = []
    sent = Published()
    out = SparkplugAlerts(
        "g",
        "agent",
        ASSETS,
        tmp_path,
        sent,
        monotonic=lambda: now[0],
        schedule=lambda delay, action: timers.append((delay, action)),
    )
    caplog.set_level(logging.INFO, logger="edge_agent.sparkplug_out")
    out.birth()  # on connect
    assert len(sent.topics) == 1 + len(ASSETS)
    command = _rebirth()
    for i in range(1000):  # within the interval after the connect's birth
        now[0] = 100.0 + 0.1 + i * 0.0005
        out.on_command(command)
    assert sent.births == 1, "commands within the interval answered at once"
    assert [round(d, 3) for d, _ in timers] == [round(REBIRTH_MIN_S - 0.1, 3)], timers
    now[0] = 100.0 + REBIRTH_MIN_S
    timers.pop()[1]()  # the interval ends: one birth for all of them
    assert sent.births == 2 and len(sent.topics) == 2 * (1 + len(ASSETS))
    # Long after: answered at once, no timer.
    now[0] = 110.0
    out.on_command(command)
    assert sent.births == 3 and timers == []
    # A birth in the meantime (a reconnection) answers a pending command: no second one.
    now[0] = 110.5
    out.on_command(command)
    out.birth()
    timers.pop()[1]()
    assert sent.births == 4 and out.rebirths_asked == 1002
    lines = [r for r in caplog.records if "rebirth" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]


def test_the_owed_birth_comes_from_a_timer_thread(tmp_path: Path) -> None:
    threads: list[str] = []
    sent = Published()

    def publish(topic: str, payload: bytes) -> None:
        threads.append(threading.current_thread().name)
        sent(topic, payload)

    # The interval's clock stands still: every command falls within it, however slow the run.
    out = SparkplugAlerts("g", "agent", ASSETS[:2], tmp_path, publish, monotonic=lambda: 5.0)
    out.birth()
    for _ in range(50):
        out.on_command(_rebirth())
    assert sent.births == 1
    wait_for(lambda: len(sent.topics) == 6, timeout=30)
    assert sent.topics[3:] == ["spBv1.0/g/NBIRTH/agent", "spBv1.0/g/DBIRTH/agent/asset-0",
                               "spBv1.0/g/DBIRTH/agent/asset-1"]  # fmt: skip
    assert threads[3:] == ["sparkplug rebirth"] * 3, threads
