"""Alert latency and throughput, end to end on loopback.

    python tests/benchmarks/bench_alerts.py [--assets 4] [--seconds 1800] [--speed 10]
                                            [--devices 20] [--events 200]

Latency: a real agent (in this process, ONNX Runtime, a model trained here on simulated pump
data) reads single-reading MQTT messages from Mosquitto for `--assets` pumps replayed at
`--speed`x with injected faults; the control plane runs in its own process. For each alert
a `watch` client receives, the latency is from the publish of the reading that completed
the raising window to the alert's arrival. That includes, in data time (divided by the
replay speed; run with `--speed 1` for wall-clock figures), the wait for the next reading
(a slot's value is the latest reading at or before it, so it can close only once a later
reading arrived) and the agent's `ingest.max_lateness_s` (default 2 sampling periods).
Baseline in the same run: a raw paho subscriber on the same broker, publish to receive, for
the same readings.

Throughput: `--devices` light devices (the agent's real outbox, RecordSync and
CloudSession) each sync `--events` raise/clear alert events at once; alerts per second is
changes delivered to a `watch` client per second. Baseline in the same run: the same
devices syncing the same number of prediction records (no alert folding, no watch).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cloud.demo_data import live_stream, write_training_data
from cloud.local_broker import start_local_broker
from cloud.model.pipeline import TrainOptions, train_bundle
from cloud.model.train import TrainParams
from cloud.state_dir import load_secrets
from edge_agent.agent import Agent
from edge_agent.calibration import DecisionParams
from edge_agent.config import load_agent_config
from edge_agent.decisions import AlertEvent
from edge_agent.identity import DeviceIdentity
from edge_agent.ingest.mqtt import new_client
from edge_agent.outbox import ALERT, PREDICTION, Outbox
from edge_agent.retry import Backoff
from edge_agent.session import CloudSession
from edge_agent.simulate import publish_streams
from edge_agent.sync import RecordSync
from edge_agent.wire import alert_record
from protos.autoglm.v1 import agent_pb2, common_pb2, operator_pb2
from tests.benchmarks.fleet import PlaneProcess, enroll_fleet, percentile, start_plane_process


class Watch:
    """A `watch_alerts` client in a thread; arrival time of every firing alert."""

    def __init__(self, plane: PlaneProcess) -> None:
        self.client = plane.client()
        self.firing: list[tuple[float, operator_pb2.Alert]] = []
        self.resolved: set[str] = set()
        self.error: Exception | None = None
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        request = operator_pb2.WatchAlertsRequest(after_revision=0)
        try:
            for alert in self.client.watch_alerts(request, resume=False):
                if alert.state == operator_pb2.Alert.STATE_RESOLVED:
                    self.resolved.add(alert.id)
                if alert.state == operator_pb2.Alert.STATE_FIRING and alert.raised_events == 1:
                    self.firing.append((time.time(), alert))
        except Exception as exc:  # noqa: BLE001 - the plane stopped at the end
            self.error = exc


def latency(plane: PlaneProcess, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    broker = start_local_broker(work / "broker", "mosquitto")
    key = load_secrets(plane.state).signing_key
    data = write_training_data(work / "train")
    options = TrainOptions(
        name="pump", version="1", window=32, hidden=16, calibration_rows=120,
        train=TrainParams(epochs=6),
        decision=DecisionParams(),
    )  # fmt: skip
    train_bundle([data], work / "bundle", options, key, log=lambda _: None)
    identity = enroll_fleet(plane, 0, 1)[0]
    assets = [f"pump-{i + 1}" for i in range(args.assets)]
    config = load_agent_config(
        None,
        {
            "state_dir": work / "agents" / "00000",
            "mqtt": {"host": "127.0.0.1", "port": broker.port},
            "assets": [{"name": a, "topics": [f"plant/{a}/+"]} for a in assets],
            "model": {"bundle": work / "bundle"},
            "ingest": {
                "max_lateness_s": args.lateness,
                "close_complete_slots": not args.no_early_close,
            },
            "cloud": {"heartbeat_interval_s": 1.0},
        },
    )
    del identity  # enrolled into the agent's state dir above
    agent = Agent(config)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    runner = threading.Thread(target=loop.run_until_complete, args=(agent.run(stop),), daemon=True)
    runner.start()
    while not agent.runtime.mqtt.connected.is_set():
        time.sleep(0.05)
    watch = Watch(plane)

    # The raw baseline: a bare paho subscriber on the same broker and readings. It also
    # receives the site alerts the agent publishes (first `raised` per asset and window).
    raw: list[float] = []
    sent_at: dict[bytes, float] = {}
    site: list[tuple[float, dict[str, Any]]] = []

    def on_message(_c: Any, _u: Any, m: Any) -> None:
        if m.topic.startswith("autoglm/alerts/"):
            event = json.loads(m.payload)
            if event["kind"] == "raised":
                site.append((time.time(), event))
            return
        raw.append(time.time() - sent_at.get(m.payload, time.time()))

    sub = new_client()
    sub.on_message = on_message
    sub.connect("127.0.0.1", broker.port)
    sub.loop_start()
    sub.subscribe([("plant/#", 1), ("autoglm/alerts/#", 1)])
    pub = new_client()
    pub.max_inflight_messages_set(1000)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    time.sleep(0.5)

    streams = [live_stream(i, args.seconds, seed=7) for i in range(len(assets))]
    rows: dict[str, list[tuple[float, float]]] = {a: [] for a in assets}  # (data ts, published)
    last: list[Any] = []

    def publish(topic: str, payload: bytes) -> None:
        sent_at[payload] = time.time()
        last[:] = [pub.publish(topic, payload, qos=1)]

    def on_sent(i: int, offset: float, ts: float) -> None:
        series = rows[assets[i]]
        if series and series[-1][0] == ts:
            series[-1] = (ts, time.time())  # the row's last sensor
        else:
            series.append((ts, time.time()))

    pairs = [(f"plant/{a}", s) for a, s in zip(assets, streams, strict=True)]
    publish_streams(publish, pairs, args.speed, 1, on_sent)
    if last:
        last[0].wait_for_publish(30)
    time.sleep(3)

    def since_reading(asset: str, raised: float, received: float) -> float | None:
        # The newest row at or before the raising slot's time: the reading that completed
        # the raising window (the slot's value is the latest reading at or before it).
        series = rows.get(asset, [])
        k = bisect.bisect_right([ts for ts, _ in series], raised + 1e-6) - 1
        if k >= 0 and raised - series[k][0] <= 1.0:
            return (received - series[k][1]) * 1000
        return None

    latencies = [
        ms
        for received, alert in watch.firing
        if (ms := since_reading(alert.asset, alert.first_seen.ToNanoseconds() / 1e9, received))
        is not None
    ]
    on_site = [
        ms
        for received, event in site
        if (ms := since_reading(event["asset"], float(event["window_end"]), received)) is not None
    ]
    faults = sum(len(s.faults) for s in streams)
    loop.call_soon_threadsafe(stop.set)
    runner.join(20)
    for c in (sub, pub):
        c.disconnect()
        c.loop_stop()
    broker.stop()
    return {
        "faults_injected": faults,
        "alerts": len(watch.firing),
        "matched": len(latencies),
        "p50_ms": percentile(latencies, 0.5) * 1.0,
        "p99_ms": percentile(latencies, 0.99),
        "site_alerts": len(site),
        "site_matched": len(on_site),
        "site_p50_ms": percentile(on_site, 0.5),
        "site_p99_ms": percentile(on_site, 0.99),
        "raw_mqtt_p50_ms": percentile(raw, 0.5) * 1000,
        "raw_mqtt_p99_ms": percentile(raw, 0.99) * 1000,
        "readings": len(raw),
    }


async def _sync_all(
    identities: list[DeviceIdentity], outboxes: list[Outbox], done: Any, timeout: float
) -> float:
    stop = asyncio.Event()
    sessions = [
        CloudSession(
            ident,
            status=lambda: agent_pb2.AgentStatus(),
            host=lambda: common_pb2.HostFacts(hostname="bench"),
            backoff=Backoff(0.2, 2),
            heartbeat_interval_s=10,
            sync=RecordSync(box, 200, 4),
        )
        for ident, box in zip(identities, outboxes, strict=True)
    ]
    t0 = time.monotonic()
    tasks = [asyncio.create_task(s.run(stop)) for s in sessions]
    while not done() and time.monotonic() - t0 < timeout:
        await asyncio.sleep(0.01)
    elapsed = time.monotonic() - t0
    stop.set()
    await asyncio.gather(*tasks)
    return elapsed


def throughput(plane: PlaneProcess, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    # Separate devices for the two runs: a device's sequence numbers continue across its
    # sessions, so a second outbox starting at 1 would be taken for records already stored.
    for_baseline = enroll_fleet(plane, 1, args.devices)
    identities = enroll_fleet(plane, 1 + args.devices, args.devices)
    per_device = args.events
    total = args.devices * per_device

    def boxes(kind: str) -> list[Outbox]:
        out = []
        for i, _ in enumerate(identities):
            box = Outbox(work / f"box-{kind}-{i}.sqlite3", 1 << 26)
            t = 1_790_000_000.0
            if kind == "alerts":
                kinds = ("raised", "cleared")
                records = [
                    (ALERT, _event(kinds[k % 2], f"pump-{k // 2 % 4}", t + k))
                    for k in range(per_device)
                ]
            else:
                records = [(PREDICTION, _prediction(t + k)) for k in range(per_device)]
            box.append(records)
            out.append(box)
        return out

    prediction_boxes = boxes("predictions")
    base_s = asyncio.run(
        _sync_all(
            for_baseline,
            prediction_boxes,
            lambda: all(b.stats().depth == 0 for b in prediction_boxes),
            120,
        )
    )
    watch = Watch(plane)
    time.sleep(0.5)
    alert_boxes = boxes("alerts")
    before = len(watch.resolved)
    episodes = total // 2  # each raise is cleared: every alert ends resolved
    alerts_s = asyncio.run(
        _sync_all(identities, alert_boxes, lambda: len(watch.resolved) - before >= episodes, 120)
    )
    return {
        "devices": args.devices,
        "records": total,
        "alerts_resolved_seen": len(watch.resolved) - before,
        "alerts_per_s": total / alerts_s,
        "baseline_predictions_per_s": total / base_s,
        "ratio": (total / alerts_s) / (total / base_s),
    }


def _event(kind: str, asset: str, at: float) -> bytes:
    return alert_record(
        AlertEvent(kind=kind, key=f"{asset}:{int(at)}", asset=asset, score=1.5,
                   top_sensors=(("Current", 0.6),), window_start=at - 32, window_end=at,
                   raised_at=at, model_version="1")
    )  # fmt: skip


def _prediction(at: float) -> bytes:
    record = agent_pb2.Record(prediction=agent_pb2.Prediction(asset="pump-1", score=0.3))
    record.prediction.window_start.FromNanoseconds(int((at - 32) * 1e9))
    record.prediction.window_end.FromNanoseconds(int(at * 1e9))
    return record.SerializeToString()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=1800, help="data seconds per asset")
    parser.add_argument("--speed", type=float, default=10.0)
    parser.add_argument(
        "--lateness",
        type=float,
        default=0.0,
        help="the agent's ingest.max_lateness_s (0: its default, 2 sampling periods)",
    )
    parser.add_argument(
        "--no-early-close",
        action="store_true",
        help="the agent's ingest.close_complete_slots off: every slot waits the lateness",
    )
    parser.add_argument("--latency-only", action="store_true", help="skip the throughput part")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--events", type=int, default=200, help="alert events per device")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="autoglm-bench-alerts-"))
    plane = start_plane_process(work)
    try:
        lat = latency(plane, work, args)
        thr = None if args.latency_only else throughput(plane, work, args)
    finally:
        plane.stop()
    print(
        f"latency: {lat['matched']}/{lat['alerts']} alerts matched to their raising reading "
        f"({lat['faults_injected']} faults injected); reading published -> alert on watch: "
        f"p50 {lat['p50_ms']:.0f} ms, p99 {lat['p99_ms']:.0f} ms; raw MQTT hop in the same "
        f"run ({lat['readings']} readings): p50 {lat['raw_mqtt_p50_ms']:.1f} ms, "
        f"p99 {lat['raw_mqtt_p99_ms']:.1f} ms"
    )
    print(
        f"on site: {lat['site_matched']}/{lat['site_alerts']} alerts on the agent's MQTT alert "
        f"topic; reading published -> site alert: p50 {lat['site_p50_ms']:.0f} ms, "
        f"p99 {lat['site_p99_ms']:.0f} ms"
    )
    if thr is None:
        print(json.dumps({"latency": lat}, indent=1))
        return 0
    print(
        f"throughput: {thr['devices']} devices x {args.events} alert events: "
        f"{thr['alerts_per_s']:.0f} alert events/s stored, folded and seen resolved on the "
        f"watch stream ({thr['alerts_resolved_seen']} alerts); the same devices "
        f"syncing as many predictions: {thr['baseline_predictions_per_s']:.0f}/s "
        f"(ratio {thr['ratio']:.2f})"
    )
    print(json.dumps({"latency": lat, "throughput": thr}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
