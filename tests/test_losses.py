"""Stretches of lost records (disk full) as the heartbeat reports them and `device show`
prints them."""

from __future__ import annotations

import argparse

import pytest

from cloud.cli.device_cmds import cmd_show
from edge_agent.losses import KEPT, UNCLEAN_STOP, LossLog
from edge_agent.wire import lost_records
from protos.autoglm.v1 import operator_pb2

pytestmark = pytest.mark.unit


def test_losses_group_into_stretches_ended_by_a_write() -> None:
    log = LossLog()
    log.written()  # nothing lost: nothing to end
    log.lost(3, 100.0)
    log.lost(2, 160.5)
    (open_,) = log.recent()
    assert (open_.first, open_.last, open_.records, open_.ongoing) == (100.0, 160.5, 5, True)
    log.written()
    log.lost(1, 300.0)
    closed, current = log.recent()
    assert not closed.ongoing and current.ongoing and current.records == 1
    for i in range(KEPT + 5):
        log.written()
        log.lost(1, 400.0 + i)
    assert len(log.recent()) == KEPT


def test_device_show_prints_when_records_were_lost(capsys: pytest.CaptureFixture[str]) -> None:
    log = LossLog()
    log.lost(1200, 1_764_000_000.0)
    log.lost(10, 1_764_000_600.0)
    log.written()
    log.lost(7, 1_764_003_600.0)
    device = operator_pb2.Device(name="edge-1", id="d-1", state=operator_pb2.Device.STATE_ACTIVE)
    device.status.health.lost_records.extend(lost_records(log.recent()))

    class Client:
        def get_device(self, name: str) -> operator_pb2.Device:
            return device

    args = argparse.Namespace(device="edge-1", json=False)
    assert cmd_show(args, Client()) == 0  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert "lost:        1210 record(s) (disk full) from 2025-11-24 16:00:00Z to 2025-11-24 " \
           "16:10:00Z" in out, out  # fmt: skip
    assert "lost:        7 record(s) (disk full) from 2025-11-24 17:00:00Z ongoing" in out, out


def test_device_show_says_which_windows_a_killed_agent_never_scored(
    capsys: pytest.CaptureFixture[str],
) -> None:
    log = LossLog()
    log.gap(1_764_000_000.0, 1_764_000_044.0, 23, UNCLEAN_STOP)
    (gap,) = lost_records(log.recent())
    assert gap.reason == "unclean_stop" and not gap.ongoing
    device = operator_pb2.Device(name="edge-1", id="d-1", state=operator_pb2.Device.STATE_ACTIVE)
    device.status.health.lost_records.append(gap)

    class Client:
        def get_device(self, name: str) -> operator_pb2.Device:
            return device

    assert cmd_show(argparse.Namespace(device="edge-1", json=False), Client()) == 0  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert "lost:        23 record(s) (killed: windows not scored) from 2025-11-24 16:00:00Z to " \
           "2025-11-24 16:00:44Z" in out, out  # fmt: skip
