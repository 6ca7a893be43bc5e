"""A Sparkplug B edge node made with a library we did not write (pysparkplug), as a PLC
gateway would run it: NBIRTH (with bdSeq) and DBIRTH on connect, DDATA of the rows it is
given, NDEATH as its will. It answers `Node Control/Rebirth` by publishing its births again.

Runs in its own virtual environment (`make setup` builds .venv-sparkplug: pysparkplug needs
paho-mqtt 1, the project paho-mqtt 2). Driven by the tests through stdin, one JSON command
per line, and reports on stdout, one JSON line per event:

    {"rows": [[v, ...], ...], "ts": [t, ...]}   one DDATA per row (metric timestamps: ts, ms)
    {"gap": true}                                skip a sequence number (a lost message)

Killed (SIGKILL), its connection drops and the broker publishes its NDEATH.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import pysparkplug as psp


def say(**doc: object) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--sensors", required=True, help="comma-separated metric names")
    args = parser.parse_args()
    sensors = args.sensors.split(",")
    now = psp.get_current_timestamp()
    device = psp.Device(
        args.device,
        [
            psp.Metric(timestamp=now, name=s, datatype=psp.DataType.DOUBLE, value=0.0)
            for s in sensors
        ],
    )

    def rebirth(node: psp.EdgeNode, message: psp.Message) -> None:
        metrics = {m.name: m.value for m in message.payload.metrics}
        if metrics.get("Node Control/Rebirth") is not True:
            return
        # pysparkplug births only on connect: publish the same births again, seq from 0.
        node._EdgeNode__seq_cycler = itertools.cycle(range(256))
        stamp = psp.get_current_timestamp()
        node_topic = psp.Topic(
            group_id=args.group, message_type=psp.MessageType.NBIRTH, edge_node_id=args.node
        )
        # The library readies the next connection's bdSeq right after a birth: this
        # connection's (the one its NDEATH will carries) is the one before.
        bd_seq = psp.Metric(stamp, "bdSeq", psp.DataType.INT64,
                            value=(node._bd_seq_metric.value - 1) % 256)  # fmt: skip
        birth = psp.NBirth(stamp, node._seq, (*node.metrics.values(), bd_seq))
        node._client.publish(psp.Message(node_topic, birth, psp.QoS.AT_MOST_ONCE, False),
                             include_dtypes=True)  # fmt: skip
        device_topic = psp.Topic(
            group_id=args.group, message_type=psp.MessageType.DBIRTH, edge_node_id=args.node,
            device_id=args.device,
        )  # fmt: skip
        dbirth = psp.DBirth(stamp, node._seq, tuple(device.metrics.values()))
        node._client.publish(psp.Message(device_topic, dbirth, psp.QoS.AT_MOST_ONCE, False),
                             include_dtypes=True)  # fmt: skip
        say(event="rebirth")

    node = psp.EdgeNode(args.group, args.node, [], cmd_callback=rebirth)
    node.register(device)
    node.connect("127.0.0.1", port=args.port, blocking=False)
    time.sleep(0.5)
    say(event="born")
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("gap"):
            node._seq  # noqa: B018 - consumes a sequence number: the broker never sees it
            say(event="gap")
        else:
            for row, ts in zip(command["rows"], command["ts"], strict=True):
                stamp = int(ts * 1000)
                node.update_device(
                    args.device,
                    [psp.Metric(timestamp=stamp, name=s, datatype=psp.DataType.DOUBLE,
                                value=float(v)) for s, v in zip(sensors, row, strict=True)],
                )  # fmt: skip
            say(event="sent", rows=len(command["rows"]))


if __name__ == "__main__":
    main()
