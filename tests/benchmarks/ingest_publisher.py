"""The publisher process of `bench_ingest.py`: builds its payloads, connects, waits for a line on
stdin, publishes them all as fast as the broker takes them, prints its messages per second.

    python ingest_publisher.py ROOT PORT qos0|qos1|batched|sparkplug ROWS BATCH_ROWS START SENSORS

sparkplug: a Sparkplug B edge node `bench` with device `pump-1`: NBIRTH, DBIRTH, then DDATA of
BATCH_ROWS rows of every sensor (by alias, with metric timestamps).
"""

from __future__ import annotations

import sys
import time

import orjson


def payloads(
    mode: str, rows: int, batch: int, start: float, sensors: list[str]
) -> list[tuple[str, bytes]]:
    out = []
    if mode == "sparkplug":
        import numpy as np

        from edge_agent.simulate_sparkplug import SimulatedNode

        node = SimulatedNode("plant", "bench", [("pump-1", sensors)])
        out += node.births()
        for a in range(0, rows, batch):
            ts = np.asarray([start + r for r in range(a, min(a + batch, rows))])
            block = np.asarray(
                [[j + (r % 40) / 40 for j in range(len(sensors))] for r in range(a, a + len(ts))]
            )
            out.append(node.data("pump-1", ts, block))
        return out
    if mode == "batched":
        for a in range(0, rows, batch):
            stamps = [start + r for r in range(a, min(a + batch, rows))]
            values = {
                s: [float(j + (r % 40) / 40) for r in range(a, a + len(stamps))]
                for j, s in enumerate(sensors)
            }
            out.append(("plant/pump-1/all", orjson.dumps({"ts": stamps, "values": values})))
        return out
    for r in range(rows):
        for j, s in enumerate(sensors):
            doc = {"ts": start + r, "value": j + (r % 40) / 40}
            out.append((f"plant/pump-1/{s}", orjson.dumps(doc)))
    return out


def main() -> None:
    sys.path.insert(0, sys.argv[1])
    from edge_agent.ingest.mqtt import new_client

    port, mode, rows, batch = int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    bodies = payloads(mode, rows, batch, float(sys.argv[6]), sys.argv[7].split(","))
    qos = 0 if mode == "qos0" else 1
    client = new_client()
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    input()  # go
    t0 = time.perf_counter()
    info = None
    for topic, body in bodies:
        info = client.publish(topic, body, qos=qos)
    if info is not None:
        info.wait_for_publish(300)
    print(len(bodies) / (time.perf_counter() - t0), flush=True)
    client.disconnect()
    client.loop_stop()


if __name__ == "__main__":
    main()
