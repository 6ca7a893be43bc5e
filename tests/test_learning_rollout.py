"""The learning loop closed on real parts, through a shadow rollout: a real agent serving the
base model over a real Mosquitto raises alerts at the site's benign backflush dips and at its
real fault; the operator marks them (`autoglm alerts ack --verdict false|true`), exports
(`autoglm data export`) and fine-tunes (`autoglm model train --from-export --base pump:1`);
pump:2 is pushed and rolled out with `autoglm rollout create`; the agent runs it in shadow
beside the base on the live windows of the site's next pass (dips and fault again) and
reports agreement and alert rates; the control plane promotes it when the gates pass; on the
pass after that, the device, now serving pump:2, raises no alert at the dips and one at the
fault (counted in the alert events the control plane stores for each pass).

The gates, as an ML engineer would set them for this change: the candidate was trained to
change its verdict on the dip windows and nowhere else, so the shadow stretch must contain
the dips (`--min-shadow-windows 700`: judged only once the comparison covers rows 120-820 of
the pass, both dips and the fault, scored after the 120 calibration rows), and the behaviour
gates are set from the change expected, read off the first pass's predictions in the
control plane: the share `d` of the pass's scored windows the base flagged (score >= 1) at
the dips, the windows the candidate should no longer flag. `--min-agreement 1-d-0.05` and
`--max-alert-rate-diff d+0.05` allow that change, with 0.05 for the site's noise floor (the
base agrees with itself recalibrated at about 0.98 here), and not much more: a candidate that
also stopped flagging the fault (about 12% of the windows) or flagged the normal stretch
would fall under them. The test also checks the direction the gate cannot (it judges the
rate difference both ways): the candidate's alert rate is the lower one."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.cli.main import run as autoglm
from cloud.store.base import Store
from edge_agent.config import AgentConfig
from protos.autoglm.v1 import operator_pb2
from tests.support.agents import AgentThread, start_agent, wait_for
from tests.support.broker import Broker
from tests.support.cloud import RunningPlane, init_plane, start_plane
from tests.support.learning_site import (
    ROWS,
    Publisher,
    cli_connection,
    fine_tune,
    fleet_bundle,
    give_verdicts,
    site_config,
    site_stream,
    stream_part,
    where,
)
from tests.support.records import box_sequences, stored_sequences

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1200)]
SUCCEEDED = operator_pb2.Rollout.STATE_SUCCEEDED
MIN_SHADOW_WINDOWS = 700


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[RunningPlane]:
    """The control plane, moving rollouts every 0.2 s."""
    running = start_plane(
        tmp_path / "cloud",
        init_plane(tmp_path / "cloud").operator_token,
        presence_flush_interval_s=0.2,
        desired_poll_interval_s=0.2,
        rollout_interval_s=0.2,
    )
    yield running
    running.stop()


@pytest.fixture
def publisher(broker: Broker) -> Iterator[Publisher]:
    p = Publisher(broker)
    yield p
    p.close()


def synced(running: AgentThread, store: Store) -> None:
    """Waits until every record the agent wrote is in the control plane's store."""
    device_id = store.get_device("edge-1").id
    box = running.agent.outbox
    wait_for(lambda: stored_sequences(store, device_id) == box_sequences(box), timeout=120)


def restarted(running: AgentThread, config: AgentConfig, store: Store) -> AgentThread:
    """Stops the agent (it finishes the windows already cut) and starts it again, synced."""
    running.stop()
    running = start_agent(config)
    synced(running, store)
    return running


def raised_per_pass(store: Store, anchor: float) -> list[list[tuple[str, str]]]:
    """Per pass of the site's stream, (where, model version) of each alert raised."""
    device_id = store.get_device("edge-1").id
    passes: list[list[tuple[str, str]]] = [[], [], []]
    for e in store.list_alert_events(device_id, limit=100_000):
        if e.kind == "raised":
            row = e.window_end.timestamp() - anchor
            passes[int(row // ROWS)].append((where(row % ROWS), e.model_version))
    return passes


def expected_change(store: Store, anchor: float) -> float:
    """The share of the first pass's scored windows that the base flagged at the dips: its
    smoothed score at or above 1, the flag the shadow comparison counts (`anomalous` in a
    prediction is another thing, an alert open, which the hysteresis holds longer)."""
    device_id = store.get_device("edge-1").id
    first = [
        p
        for p in store.list_predictions(device_id, limit=1_000_000)
        if p.window_end.timestamp() - anchor < ROWS
    ]
    at_dips = [
        p for p in first if p.score >= 1.0 and where(p.window_end.timestamp() - anchor) == "dip"
    ]
    return len(at_dips) / len(first)


def test_a_fine_tuned_model_promoted_through_a_shadow_rollout_stops_the_false_alarms(
    plane: RunningPlane,
    broker: Broker,
    publisher: Publisher,
    tmp_path: Path,
    trained: tuple[Path, ed25519.Ed25519PrivateKey],
    capsys: pytest.CaptureFixture[str],
) -> None:
    bundle = fleet_bundle(trained, plane, tmp_path / "bundle")
    config = site_config(
        plane,
        broker,
        tmp_path,
        bundle,
        shadow={"interval_s": 0.5},
        updates={"retry_initial_s": 0.1, "retry_max_s": 0.5},
    )
    stream, store = site_stream(), plane.plane.store
    # Three passes of the site, back to back: pass k's row i is stamped anchor + k*ROWS + i.
    anchor = time.time() - 3 * ROWS - 60

    def play(k: int) -> None:
        stream_part(running, publisher, stream, slice(0, ROWS), anchor + k * ROWS)

    running = start_agent(config)
    try:
        # 1. The base serves the first pass; the operator judges what it raised, exports and
        # fine-tunes; pump:2 is pushed.
        play(0)
        running = restarted(running, config, store)
        connect = cli_connection(plane, tmp_path)
        give_verdicts(plane, connect, anchor)
        with plane.client() as client:
            client.push_bundle(bundle)
        export, new = tmp_path / "export", tmp_path / "pump-2"
        assert autoglm([*connect, "data", "export", "--since", "1d", "--out", str(export)]) == 0
        fine_tune(connect, export, new, tmp_path / "cloud" / "signing.key")
        with plane.client() as client:
            client.push_bundle(new)

        # 2. The rollout: pump:2 in shadow beside the base on the second pass, then promoted.
        capsys.readouterr()
        create = ["rollout", "create", "pump:2", "--selector", "site=a", "--waves", "100%"]
        change = expected_change(store, anchor)
        gates = {
            "--min-agreement": f"{math.floor((1 - change - 0.05) * 100) / 100:.2f}",
            "--max-alert-rate-diff": f"{math.ceil((change + 0.05) * 100) / 100:.2f}",
            "--min-shadow-windows": str(MIN_SHADOW_WINDOWS),
        }
        flags = [x for item in gates.items() for x in item]
        assert autoglm([*connect, *create, "--soak", "2s", *flags, "--json"]) == 0
        rollout_id = json.loads(capsys.readouterr().out)["id"]

        def rollout() -> operator_pb2.Rollout:
            with plane.client() as client:
                return client.get_rollout(rollout_id)

        wait_for(lambda: rollout().devices[0].state == "shadowing", timeout=120)
        play(1)
        wait_for(lambda: rollout().state == SUCCEEDED, timeout=300, interval=0.2)
        device_id = store.get_device("edge-1").id
        target = store.rollout_target(rollout_id, device_id)
        assert target is not None
        shadow = target.shadow
        wait_for(lambda: running.agent.model is not None and running.agent.model.version == "2")

        # 3. The third pass, served by pump:2.
        play(2)
        running = restarted(running, config, store)
    finally:
        running.stop()

    passes = raised_per_pass(store, anchor)
    figures = {k: shadow[k] for k in ("windows", "agreement", "alert_rate_candidate",
                                      "alert_rate_incumbent", "self_agreement")}  # fmt: skip
    print(f"alerts raised per pass: {passes}; base flagged {change:.3f} of the first pass's "
          f"windows at the dips; gates {gates}; shadow report judged: {figures}")  # fmt: skip
    base_first, base_shadowed, promoted = ([w for w, _ in p] for p in passes)
    assert base_first.count("dip") >= 2 and "fault" in base_first, passes
    assert base_shadowed.count("dip") >= 2 and "fault" in base_shadowed, passes
    assert {v for _, v in passes[0] + passes[1]} == {"1"}, passes
    assert promoted == ["fault"] and passes[2][0][1] == "2", passes
    assert shadow["windows"] >= MIN_SHADOW_WINDOWS, shadow
    assert shadow["alert_rate_candidate"] < shadow["alert_rate_incumbent"], shadow
