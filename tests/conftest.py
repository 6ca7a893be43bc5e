"""Shared fixtures: a real control plane over TLS on port 0, enrolled agents, PostgreSQL, a
real Mosquitto broker."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.service.serde import bootstrap_from_registration
from edge_agent.bootstrap import Bootstrap
from protos.autoglm.v1 import operator_pb2
from tests.support.broker import Broker, start_broker
from tests.support.cloud import RunningPlane, init_plane, start_plane

PG_ADMIN_DSN = os.environ.get(
    "AUTOGLM_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[RunningPlane]:
    """An initialised control plane (SQLite) serving in a background thread."""
    result = init_plane(tmp_path / "cloud")
    running = start_plane(
        tmp_path / "cloud",
        result.operator_token,
        presence_flush_interval_s=0.2,
        auth_recheck_interval_s=0.5,
        desired_poll_interval_s=0.2,
    )
    yield running
    running.stop()


def register(plane: RunningPlane, name: str, **labels: str) -> Bootstrap:
    """Registers a device through the operator API and returns its bootstrap."""
    with plane.client() as client:
        response = client.register_device(
            operator_pb2.RegisterDeviceRequest(name=name, labels=labels, profile="jetson-orin-nx")
        )
    return bootstrap_from_registration(response)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A throwaway database on the PostgreSQL server of this machine, dropped afterwards."""
    name = f"autoglm_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Ed25519PrivateKey]:
    """The small signed model the rollout tests copy into versions (one per test module)."""
    from tests.support.bundles import train_small  # torch: only for the modules that train

    return train_small(tmp_path_factory.mktemp("model"))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A Mosquitto broker of the test's own, on a free port."""
    b = start_broker(tmp_path / "broker")
    yield b
    b.stop()
