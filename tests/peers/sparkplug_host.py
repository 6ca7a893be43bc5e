"""A Sparkplug B host made with a library we did not write (pysparkplug): subscribes to an
edge node's messages and prints each DDATA as one JSON line, metrics by name (aliases
resolved from the births, as the library does it), and its NDEATH. Runs in .venv-sparkplug."""

from __future__ import annotations

import argparse
import json
import sys
import time

import pysparkplug as psp


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--node", required=True)
    args = parser.parse_args()

    def on_message(_client: psp.Client, message: psp.Message) -> None:
        if message.topic.message_type == psp.MessageType.NDEATH:
            sys.stdout.write(json.dumps({"topic": str(message.topic), "death": True}) + "\n")
            sys.stdout.flush()
            return
        if message.topic.message_type != psp.MessageType.DDATA:
            return
        metrics = {m.name: m.value for m in message.payload.metrics}
        doc = {"topic": str(message.topic), "metrics": metrics}
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()

    client = psp.Client()
    devices = psp.Topic(
        message_type=psp.SINGLE_LEVEL_WILDCARD, group_id=args.group, edge_node_id=args.node,
        device_id=psp.SINGLE_LEVEL_WILDCARD,
    )  # fmt: skip
    node = psp.Topic(message_type=psp.SINGLE_LEVEL_WILDCARD, group_id=args.group,
                     edge_node_id=args.node)  # fmt: skip
    client.subscribe(devices, psp.QoS.AT_LEAST_ONCE, on_message)
    client.subscribe(node, psp.QoS.AT_LEAST_ONCE, on_message)
    client.connect("127.0.0.1", port=args.port, blocking=False)
    time.sleep(0.5)
    sys.stdout.write(json.dumps({"event": "ready"}) + "\n")
    sys.stdout.flush()
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
