"""MQTT ingest: the agent's path (paho -> decode -> align -> windows) against a raw paho
subscriber that only counts, on the same broker, readings and publisher, in one run.

    python tests/benchmarks/bench_ingest.py [--rounds 3] [--rows 8000] [--batch-rows 24]

Modes: single readings at QoS 0 and QoS 1 (one message per sensor and second), batched
(`--batch-rows` rows of every sensor per message: 4 sensors x 24 rows = 96 readings), and
sparkplug (the same rows as Sparkplug B DDATA of one device, metrics by alias with their
timestamps; the raw subscriber counts them without decoding). The
publisher runs in its own process and publishes as fast as the broker takes it; its own rate
is printed, to show it is not what bounds the subscriber. The agent's runtime is real (a small
model trained here, site calibration on the first rows) except that cut windows are counted
instead of scored: this measures ingest, `bench-batching` and `bench-inference` measure
inference. Rounds alternate raw and agent; ratios are medians over the rounds, wall and per
CPU-second of this process (the machine is shared: the CPU figure is the fair one).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cloud.local_broker import start_local_broker
from edge_agent.batching import WindowBatch
from edge_agent.config import load_agent_config
from edge_agent.ingest.mqtt import new_client
from edge_agent.outbox import Outbox
from edge_agent.runtime import EdgeRuntime
from edge_agent.serving import open_serving
from tests.support.bundles import train_small
from tests.support.sensordata import SENSORS

PUBLISHER = Path(__file__).with_name("ingest_publisher.py")


def cpu() -> float:
    return time.process_time()


class Publisher:
    def __init__(self, port: int, mode: str, rows: int, batch: int, start: float) -> None:
        root = str(Path(__file__).resolve().parents[2])
        args = [sys.executable, str(PUBLISHER), root, str(port), mode, str(rows), str(batch)]
        self.proc = subprocess.Popen(
            [*args, repr(start), ",".join(SENSORS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.0)  # built its payloads and connected

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def rate(self) -> float:
        out, _ = self.proc.communicate(timeout=300)
        return float(out.strip() or "nan")


def wait_until(done: Any, idle_s: float = 20.0) -> None:
    last, since = None, time.monotonic()
    while not done():
        now = done.progress()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > idle_s:
            raise RuntimeError(f"stalled at {now}")
        time.sleep(0.01)


class Counting:
    def __init__(self, expected: int, progress: Any) -> None:
        self.expected = expected
        self.progress = progress

    def __call__(self) -> bool:
        return bool(self.progress() >= self.expected)


def raw_round(port: int, mode: str, rows: int, batch: int, start: float) -> dict[str, float]:
    per_message = batch * len(SENSORS) if mode in ("batched", "sparkplug") else 1
    count = [0]

    def on_message(_c: Any, _u: Any, m: Any) -> None:
        if mode != "sparkplug" or "/DDATA/" in m.topic:
            count[0] += per_message

    sub = new_client()
    sub.on_message = on_message
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    sub.subscribe("spBv1.0/#" if mode == "sparkplug" else "plant/#", qos=1)
    time.sleep(0.5)
    pub = Publisher(port, mode, rows, batch, start)
    expected = rows * len(SENSORS)
    c0, w0 = cpu(), time.perf_counter()
    pub.go()
    wait_until(Counting(expected, lambda: count[0]))
    cpu_s, wall_s = cpu() - c0, time.perf_counter() - w0
    rate = pub.rate()
    sub.disconnect()
    sub.loop_stop()
    return {"readings": count[0], "cpu_s": cpu_s, "wall_s": wall_s, "publisher_msg_s": rate}


def agent_round(
    port: int, mode: str, rows: int, batch: int, start: float, work: Path, model: Any
) -> dict[str, float]:
    bundle, key = model
    state = Path(tempfile.mkdtemp(dir=work))
    config = load_agent_config(
        None,
        {
            "state_dir": state,
            "mqtt": {"host": "127.0.0.1", "port": port},
            "assets": [
                {
                    "name": "pump-1",
                    "sparkplug": {"group": "plant", "edge_node": "bench", "device": "pump-1"},
                }
                if mode == "sparkplug"
                else {"name": "pump-1", "topics": ["plant/pump-1/+"]}
            ],
            "model": {"bundle": bundle},
            # The publisher floods one asset on purpose: the path's throughput is measured.
            "ingest": {"max_messages_per_s": 0},
        },
    )
    serving = open_serving(bundle, key.public_key(), config.model, state / "m", state / "e")
    runtime = EdgeRuntime(config, serving, Outbox(state / "o.sqlite3", 1 << 26), f"b{state.name}")
    windows = [0]
    lock = threading.Lock()

    def count(batch: WindowBatch) -> None:  # cut and counted, not scored
        with lock:
            windows[0] += len(batch)

    runtime.pipeline.emit = count  # type: ignore[method-assign]
    runtime.start()
    while not runtime.mqtt.connected.is_set():
        time.sleep(0.01)
    time.sleep(0.5)
    runner = runtime.runners[0]
    pub = Publisher(port, mode, rows, batch, start)
    expected = rows * len(SENSORS)
    c0, w0 = cpu(), time.perf_counter()
    pub.go()
    wait_until(Counting(expected, lambda: runner.aligner.readings))
    while not runtime.pipeline.queue.empty():
        time.sleep(0.005)
    cpu_s, wall_s = cpu() - c0, time.perf_counter() - w0
    rate = pub.rate()
    runtime.stop()
    serving.close()
    return {
        "readings": runner.aligner.readings,
        "windows": windows[0],
        "cpu_s": cpu_s,
        "wall_s": wall_s,
        "publisher_msg_s": rate,
        "drops": sum(runtime.decoder.drops.values()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=8000, help="rows of every sensor per run")
    parser.add_argument("--batch-rows", type=int, default=24)
    parser.add_argument("--modes", default="qos0,qos1,batched,sparkplug")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="autoglm-bench-ingest-"))
    broker = start_local_broker(work / "broker", "mosquitto")
    model = train_small(work / "model")
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    try:
        for r in range(args.rounds):
            for mode in args.modes.split(","):
                rows = args.rows * (6 if mode in ("batched", "sparkplug") else 1)
                start = time.time() - rows - 600  # in the past, inside ingest.max_past_s
                got = results.setdefault(mode, {"raw": [], "agent": []})
                got["raw"].append(raw_round(broker.port, mode, rows, args.batch_rows, start))
                got["agent"].append(
                    agent_round(broker.port, mode, rows, args.batch_rows, start, work, model)
                )
                print(f"round {r + 1} {mode}: raw {got['raw'][-1]}, agent {got['agent'][-1]}")
    finally:
        broker.stop()
    print()
    print("| mode | raw readings/CPU-s | agent readings/CPU-s | ratio per CPU-s | ratio wall |")
    print("|---|---|---|---|---|")
    for mode, got in results.items():
        raw_cpu = [x["readings"] / x["cpu_s"] for x in got["raw"]]
        agent_cpu = [x["readings"] / x["cpu_s"] for x in got["agent"]]
        per_cpu = [a / b for a, b in zip(agent_cpu, raw_cpu, strict=True)]
        wall = [
            (a["readings"] / a["wall_s"]) / (b["readings"] / b["wall_s"])
            for a, b in zip(got["agent"], got["raw"], strict=True)
        ]
        print(
            f"| {mode} | {statistics.median(raw_cpu):,.0f} | {statistics.median(agent_cpu):,.0f} "
            f"| {statistics.median(per_cpu):.2f}x | {statistics.median(wall):.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
