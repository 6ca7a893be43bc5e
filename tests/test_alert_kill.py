"""kill -9 of the data path just before or just after an alert event is written: the alert
open on the asset, the event in the outbox and what the site heard agree afterwards, so the
control plane gets a raise exactly when it gets its clear (same key, once each).

Before the fix the open alert was a file written while deciding and the site heard the event
before the outbox kept it: a kill before the raise was kept made the restarted agent clear an
alert the control plane never saw; one before the clear was kept left the control plane's
alert open forever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from edge_agent.decisions import CLEARED, RAISED
from edge_agent.outbox import ALERT, Outbox
from protos.autoglm.v1 import agent_pb2
from tests.support.bundles import train_small
from tests.support.datapath import Site, pump, site_config

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[1]

# The first run: killed (SIGKILL, by itself) just before or just after the outbox write that
# keeps the first alert event of `kind`; prints what the site heard.
_CHILD = """
import os, signal, sys
from pathlib import Path
from cryptography.hazmat.primitives import serialization
from edge_agent.outbox import ALERT
from protos.autoglm.v1 import agent_pb2
from tests.support.datapath import Site, pump, site_config

tmp, bundle, kind, when = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
key = serialization.load_pem_public_key((tmp / "key.pub").read_bytes())
site = Site(site_config(tmp, bundle, decisions={"clear_at": 0.95}), bundle, key, tmp / "1")
want = agent_pb2.AlertEvent.KIND_RAISED if kind == "raised" else agent_pb2.AlertEvent.KIND_CLEARED
append = site.outbox.append

def dying_append(records, *rest):
    hit = any(k == ALERT and agent_pb2.Record.FromString(b).alert.kind == want
              for k, b in records)
    if hit and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    seqs = append(records, *rest)
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)
    return seqs

site.outbox.append = dying_append
publish = site.runtime.site.publish

def heard(event):
    print("site", event.kind, event.key, flush=True)
    publish(event)

site.runtime.site.publish = heard
site.feed(pump(200, faulty=False, seed=1), 0)
site.feed(pump(150, faulty=True, seed=2), 200)
site.feed(pump(200, faulty=False, seed=4), 350)
print("not killed", flush=True)
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, bytes]]:
    root = tmp_path_factory.mktemp("model")
    bundle, key = train_small(root)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    yield bundle, pem


def alert_events(outbox: Outbox) -> list[tuple[str, str]]:
    """(kind, key) of the alert events in the outbox, in order: what the control plane gets."""
    out = []
    for _, kind, body in outbox.pending(0, 10**6):
        if kind == ALERT:
            alert = agent_pb2.Record.FromString(body).alert
            raised = alert.kind == agent_pb2.AlertEvent.KIND_RAISED
            out.append((RAISED if raised else CLEARED, alert.alert_key))
    return out


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("kind", [RAISED, CLEARED])
def test_a_kill_around_an_alert_write_leaves_the_cloud_a_raise_iff_its_clear(
    tmp_path: Path, trained: tuple[Path, bytes], kind: str, when: str
) -> None:
    bundle, pem = trained
    (tmp_path / "key.pub").write_bytes(pem)
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path), str(bundle), kind, when],
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr[-3000:]
    heard = [line.split()[1:] for line in child.stdout.splitlines() if line.startswith("site")]
    # Killed before the site was told: it hears of an event only once the outbox kept it.
    assert kind not in [k for k, _ in heard], heard

    config = site_config(tmp_path, bundle, decisions={"clear_at": 0.95})
    key = serialization.load_pem_public_key(pem)
    second = Site(config, bundle, key, tmp_path / "2")
    try:
        second.feed(pump(100, faulty=True, seed=3), 550)
        second.feed(pump(200, faulty=False, seed=5), 650)
        events = alert_events(second.outbox)
        still_open = second.outbox.open_alert_events()
    finally:
        second.stop()
    raises = [key for k, key in events if k == RAISED]
    clears = [key for k, key in events if k == CLEARED]
    assert raises and sorted(raises) == sorted(clears), events  # each raise has its clear
    assert len(set(raises)) == len(raises), events  # no key raised twice
    assert events[0][0] == RAISED, events  # never a clear for an alert the cloud never saw
    assert still_open == {}, still_open
    # Every raise the site heard reached the cloud too.
    assert {key for k, key in heard if k == RAISED} <= set(raises), (heard, events)
