"""`autoglm demo`: the whole system on one machine, on embedded defaults.

A control plane (temporary state, SQLite) and an MQTT broker start; a small model is trained
on simulated pump data (or on `--data`), quantized where INT8 holds up, pushed, and rolled
out to 1-3 enrolled agents; each agent's pump then streams with injected faults while the
alerts arrive on a watch stream with their top sensors. The summary compares injected and
detected faults. Every part is the real one (gRPC with TLS, the agents' MQTT ingest and
ONNX Runtime, the store); only the plant is simulated.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from cloud.client import Connection, OperatorClient
from cloud.demo_data import (
    InjectedFault,
    Score,
    SeenAlert,
    live_stream,
    score,
    write_training_data,
)
from cloud.local_broker import LocalBroker, MosquittoBroker, start_local_broker
from cloud.loop_thread import LoopThread
from cloud.model.pipeline import TrainOptions, train_bundle
from cloud.model.progress import ProgressBar
from cloud.model.quantize import quantize_bundle
from cloud.model.train import TrainParams
from cloud.service.serde import bootstrap_from_registration
from cloud.service.server import ControlPlane
from cloud.state_dir import init_state_dir, load_secrets
from cloud.store import open_store
from edge_agent.agent import Agent
from edge_agent.calibration import DecisionParams
from edge_agent.config import load_agent_config
from edge_agent.enroll import enroll
from edge_agent.errors import AutoglmError, FailedPrecondition, InvalidInput
from edge_agent.ingest.mqtt import new_client
from edge_agent.simulate import publish_streams
from protos.autoglm.v1 import operator_pb2

log = logging.getLogger(__name__)
MIN_DURATION_S = 20
SPEED = 15.0  # data seconds per wall-clock second while streaming


@dataclass
class DemoOptions:
    duration_s: float = 60.0  # of live streaming, after the setup
    agents: int = 2
    data: Path | None = None  # train on these CSV/Parquet files instead of simulated data
    broker: str = "auto"  # auto | mosquitto | embedded
    epochs: int = 6
    keep: bool = False  # keep the temporary state directory
    seed: int = 0
    console: bool = False  # serve the web console (on console_port; 0: any free port)
    console_port: int = 0


@dataclass
class DemoSummary:
    faults_injected: int
    faults_detected: int
    false_alarms: int
    alert_latency_p50_ms: float | None
    alert_latency_p99_ms: float | None
    agents: int
    broker: str
    model: str
    variants: list[str]
    streamed_data_seconds: int
    replay_speed: float
    seconds: float
    state_dir: str = ""
    alerts: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Demo:
    def __init__(self, options: DemoOptions, out: TextIO, progress: TextIO) -> None:
        if options.duration_s < MIN_DURATION_S:
            raise InvalidInput(f"--duration must be at least {MIN_DURATION_S} seconds")
        if not 1 <= options.agents <= 3:
            raise InvalidInput("--agents must be 1, 2 or 3")
        if not 0 <= options.console_port <= 65535:
            raise InvalidInput("--console-port must be from 0 to 65535")
        if options.data is not None and not options.data.exists():
            raise InvalidInput(f"--data {options.data}: no such file or directory")
        self.o = options
        self.out = out
        self.progress = progress
        self.work = Path(tempfile.mkdtemp(prefix="autoglm-demo-"))
        self.cleanups: list[Callable[[], None]] = []
        self.alerts: list[SeenAlert] = []
        self.alert_docs: list[dict[str, Any]] = []
        self.console_url = ""

    def say(self, text: str) -> None:
        self.progress.write(f"[{dt.datetime.now():%H:%M:%S}] {text}\n")
        self.progress.flush()

    def run(self, hold: Callable[[DemoSummary], None] | None = None) -> DemoSummary:
        """Runs the scenario; with the console on, `hold` gets the summary while everything
        still runs (it returns when the person is done with the console)."""
        started = time.monotonic()
        try:
            client, plane_state = self._control_plane()
            broker = self._broker()
            bundle, variants = self._model(plane_state)
            with client:
                model = client.push_bundle(bundle, ProgressBar("push", self.progress, unit="bytes"))
                self.say(f"pushed model {model.name}:{model.version} ({', '.join(variants)})")
                names = self._agents(client, broker)
                self._rollout(client, len(names))
                faults = self._stream(client, broker, names)
            result: Score = score(faults, self.alerts)
            summary = DemoSummary(
                **asdict(result),
                agents=len(names),
                broker=broker.kind,
                model=f"{model.name}:{model.version}",
                variants=variants,
                streamed_data_seconds=int(self.o.duration_s * SPEED),
                replay_speed=SPEED,
                seconds=round(time.monotonic() - started, 1),
                state_dir=str(self.work) if self.o.keep else "",
                alerts=self.alert_docs,
            )
            if hold is not None and self.console_url:
                hold(summary)
        finally:
            for cleanup in reversed(self.cleanups):
                with contextlib.suppress(Exception):
                    cleanup()
        if not self.o.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        return summary

    # ---- the parts ----
    def _control_plane(self) -> tuple[OperatorClient, Path]:
        state = self.work / "cloud"
        init = init_state_dir(
            state, ["localhost"], api_listen="127.0.0.1:0", device_listen="127.0.0.1:0"
        )
        overrides: dict[str, Any] = {"rollout_interval_s": 0.5, "presence_flush_interval_s": 0.5}
        if self.o.console:
            overrides["console_listen"] = f"127.0.0.1:{self.o.console_port}"
        config = init.config.model_copy(update=overrides)
        plane = ControlPlane(config, load_secrets(state), open_store(config.resolved_database_url))
        runner = LoopThread("control-plane")
        runner.run(plane.start())
        self.cleanups.append(runner.close)
        self.cleanups.append(lambda: runner.run(plane.stop(0.5)))
        self.say(
            f"control plane up: API 127.0.0.1:{plane.api_port} (TLS), devices "
            f"127.0.0.1:{plane.device_port} (mutual TLS), SQLite in {state}"
        )
        ca = (state / "ca.crt").read_bytes()
        connection = Connection(f"localhost:{plane.api_port}", ca, init.operator_token)
        client = OperatorClient(connection)
        if self.o.console:
            self._announce_console(client, plane, state, init.operator_token)
        return client, state

    def _announce_console(
        self, client: OperatorClient, plane: ControlPlane, state: Path, token: str
    ) -> None:
        """Says where the console is and how to sign in: the demo's admin token, and a viewer
        token to see what a read-only operator gets."""
        viewer = client.add_operator("demo-viewer", "viewer").token
        self.console_url = f"http://127.0.0.1:{plane.console_port}/"
        self.say(f"console: {self.console_url} (sign in with a token below)")
        self.say(f"  admin token:  {token}")
        self.say(f"  viewer token: {viewer} (sees everything, every action refused)")
        self.say(
            f"  the CLI beside it: autoglm --server localhost:{plane.api_port} --ca-cert "
            f"{state / 'ca.crt'} --token {token} alerts list"
        )

    def _broker(self) -> LocalBroker:
        broker = start_local_broker(self.work / "broker", self.o.broker)
        self.cleanups.append(broker.stop)
        self.say(f"MQTT broker up: {broker.kind} on {broker.address}")
        return broker

    def _model(self, plane_state: Path) -> tuple[Path, list[str]]:
        data = self.o.data or write_training_data(self.work / "training-data", self.o.seed)
        key = load_secrets(plane_state).signing_key
        options = TrainOptions(
            name="pump",
            version="1",
            window=32,
            hidden=16,
            calibration_rows=120,
            train=TrainParams(epochs=self.o.epochs, seed=self.o.seed),
            decision=DecisionParams(),
        )
        self.say(f"training on {data} ...")
        bar = ProgressBar("train", self.progress)
        out = self.work / "bundle"
        train_bundle([data], out, options, key, progress=bar, log=self.say)
        bar.close()
        variants = ["fp32"]
        try:
            result = quantize_bundle(out, "int8", data, 120, 0.05, key)
            variants.append("int8")
            self.say(
                f"INT8 variant kept: F1 {result.f1_variant:.3f} (fp32 {result.f1_reference:.3f})"
            )
        except (FailedPrecondition, InvalidInput) as exc:
            self.say(f"INT8 variant not kept: {exc}")
        return out, variants

    def _agents(self, client: OperatorClient, broker: LocalBroker) -> list[str]:
        protocol = "5" if isinstance(broker, MosquittoBroker) else "3.1.1"
        names = []
        for i in range(1, self.o.agents + 1):
            name = f"pump-station-{i}"
            registration = client.register_device(
                operator_pb2.RegisterDeviceRequest(name=name, labels={"site": "demo"})
            )
            state = self.work / "agents" / name
            enroll(bootstrap_from_registration(registration), state)
            config = load_agent_config(
                None,
                {
                    "state_dir": state,
                    "cloud": {"heartbeat_interval_s": 1.0},
                    "reconnect": {"initial_s": 0.2, "max_s": 2.0},
                    "mqtt": {
                        "host": "127.0.0.1",
                        "port": broker.port,
                        "protocol": protocol,
                        "alert_prefix": f"demo/{name}",
                    },
                    "assets": [{"name": f"pump-{i}", "topics": [f"plant/pump-{i}/+"]}],
                    "log_level": "WARNING",
                },
            )
            agent = Agent(config)
            runner = LoopThread(name)
            stop = asyncio.Event()
            task = runner.spawn(agent.run(stop))
            self.cleanups.append(runner.close)
            self.cleanups.append(functools.partial(_stop, runner, stop, task))
            names.append(name)
        self.say(f"{len(names)} agents enrolled (keys made on the device) and running")
        return names

    def _rollout(self, client: OperatorClient, devices: int) -> None:
        deadline = time.monotonic() + 60
        while sum(d.online for d in client.list_devices("site=demo")) < devices:
            if time.monotonic() > deadline:
                raise FailedPrecondition("the demo agents did not come online within 60 s")
            time.sleep(0.2)
        rollout = client.create_rollout(
            operator_pb2.CreateRolloutRequest(
                model_name="pump",
                model_version="1",
                selector="site=demo",
                waves=["1", "100%"],
                soak_seconds=0,
            )
        )
        self.say(f"rollout {rollout.id[:8]}: waves 1, 100% ...")
        while True:
            rollout = client.get_rollout(rollout.id)
            if rollout.state != operator_pb2.Rollout.STATE_RUNNING:
                break
            if time.monotonic() > deadline + 120:
                raise FailedPrecondition("the demo rollout did not finish within 3 minutes")
            time.sleep(0.3)
        if rollout.state != operator_pb2.Rollout.STATE_SUCCEEDED:
            raise FailedPrecondition(f"the demo rollout ended {rollout.reason or rollout.state}")
        self.say(f"rollout succeeded: every agent serves pump:1 ({rollout.devices[0].detail})")

    def _stream(
        self, client: OperatorClient, broker: LocalBroker, names: list[str]
    ) -> list[InjectedFault]:
        watching = threading.Thread(target=self._watch, args=(client,), daemon=True)
        watching.start()
        seconds = int(self.o.duration_s * SPEED)
        streams = [live_stream(i, seconds, self.o.seed) for i in range(len(names))]
        kinds = sorted({f.kind for s in streams for f in s.faults})
        self.say(
            f"streaming {seconds} s of pump data per station at {SPEED:g}x "
            f"({self.o.duration_s:g} s), injecting {sum(len(s.faults) for s in streams)} "
            f"faults ({', '.join(kinds)}) ..."
        )
        protocol = "5" if isinstance(broker, MosquittoBroker) else "3.1.1"
        publisher = new_client(protocol=protocol)
        publisher.max_inflight_messages_set(1000)
        publisher.connect("127.0.0.1", broker.port)
        publisher.loop_start()
        faults: list[InjectedFault] = []
        pending = {(i, f) for i, s in enumerate(streams) for f in s.faults}
        last: list[Any] = []

        def publish(topic: str, payload: bytes) -> None:
            last[:] = [publisher.publish(topic, payload, qos=1)]

        def sent(i: int, offset: float, ts: float) -> None:
            """Records each fault's wall-clock start when its first reading goes out."""
            for j, f in [p for p in pending if p[0] == i and offset >= p[1].start_s]:
                start = ts - offset + f.start_s
                faults.append(
                    InjectedFault(f"pump-{i + 1}", f.kind, start, start + f.duration_s, time.time())
                )
                pending.discard((j, f))

        try:
            prefixes = [f"plant/pump-{i + 1}" for i in range(len(streams))]
            publish_streams(publish, list(zip(prefixes, streams, strict=True)), SPEED, 10, sent)
            if last:
                last[0].wait_for_publish(30)
            time.sleep(3.0)  # the last windows score and sync
        finally:
            publisher.disconnect()
            publisher.loop_stop()
        return faults

    def _watch(self, client: OperatorClient) -> None:
        try:
            for alert in client.watch_alerts(operator_pb2.WatchAlertsRequest()):
                if alert.state != operator_pb2.Alert.STATE_FIRING or any(
                    a.alert_id == alert.id for a in self.alerts
                ):
                    continue
                now = time.time()
                top = tuple(s.sensor for s in alert.top_sensors[:3])
                first = alert.first_seen.ToDatetime(tzinfo=dt.UTC)
                self.alerts.append(SeenAlert(alert.id, alert.asset, first.timestamp(), now, top))
                self.alert_docs.append(
                    {
                        "id": alert.id,
                        "device": alert.device_name,
                        "asset": alert.asset,
                        "peak_score": round(alert.peak_score, 3),
                        "top_sensors": list(top),
                    }
                )
                self.say(
                    f"ALERT {alert.device_name}/{alert.asset}: score {alert.peak_score:.2f}, "
                    f"top sensors {', '.join(top)}"
                )
        except AutoglmError:
            return  # the control plane stopped at the end of the demo


def _stop(runner: LoopThread, stop: asyncio.Event, task: Any) -> None:
    runner.loop.call_soon_threadsafe(stop.set)
    with contextlib.suppress(Exception):
        task.result(20)


def print_summary(summary: DemoSummary, out: TextIO) -> None:
    def ms(value: float | None) -> str:
        return f"{value:.0f} ms" if value is not None else "-"

    out.write(
        "\nSummary\n"
        f"  faults injected   {summary.faults_injected}\n"
        f"  faults detected   {summary.faults_detected}\n"
        f"  false alarms      {summary.false_alarms}\n"
        f"  alert latency     p50 {ms(summary.alert_latency_p50_ms)}, "
        f"p99 {ms(summary.alert_latency_p99_ms)} (first faulty reading published -> alert on "
        f"the watch stream; replay at {summary.replay_speed:g}x)\n"
        f"  agents {summary.agents}, broker {summary.broker}, model {summary.model} "
        f"({', '.join(summary.variants)}), {summary.seconds:.0f} s in all\n"
    )
    if summary.state_dir:
        out.write(f"  state kept in {summary.state_dir}\n")
