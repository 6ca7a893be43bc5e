"""A real Mosquitto for tests, on a free port (the product's own launcher, `cloud.local_broker`)."""

from __future__ import annotations

from pathlib import Path

from cloud.local_broker import MosquittoBroker, free_port

Broker = MosquittoBroker
__all__ = ["Broker", "free_port", "start_broker"]


def start_broker(directory: Path) -> Broker:
    broker = Broker(directory, free_port())
    broker.start()
    return broker
