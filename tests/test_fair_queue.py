"""Per-asset fairness on the way to the pipeline: an asset flooding the agent waits behind
its own backlog; a full asset makes its source wait (back-pressure), then drops and counts;
other assets are untouched. Then a real agent data path with one asset flooded over MQTT."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edge_agent.ingest.decode import Chunk
from edge_agent.ingest.fair_queue import FairQueue

pytestmark = pytest.mark.unit


def _chunk(asset: int, n: int) -> list[Chunk]:
    ts = np.arange(n, dtype=np.float64)
    return [Chunk(asset, 0, ts, ts.copy())]


def test_a_flooded_asset_waits_behind_itself_not_the_others() -> None:
    drops: list[tuple[int, int]] = []
    q = FairQueue(3, max_readings=1_000_000, on_drop=lambda a, n: drops.append((a, n)))
    for i in range(10_000):
        q.put((0, 0, float(i), 1.0))  # asset 0 floods
    q.put((1, 0, 5.0, 2.0))
    q.put(_chunk(2, 7))
    first = q.take(limit=3, timeout=0)
    assert [item[0] if isinstance(item, tuple) else item[0].asset for item in first] == [0, 1, 2]
    assert q.pending(0) == 9_999 and q.pending(1) == 0 and q.pending(2) == 0
    rest = q.take(limit=100_000, timeout=0)
    assert len(rest) == 9_999 and q.empty() and drops == []


def test_a_message_for_several_assets_is_split_and_counted_per_asset() -> None:
    q = FairQueue(2, max_readings=100, on_drop=lambda a, n: None)
    q.put([*_chunk(0, 4), *_chunk(1, 6), *_chunk(0, 2)])
    assert q.pending(0) == 6 and q.pending(1) == 6
    taken = q.take(limit=10, timeout=0)
    assert sorted(sum(c.ts.size for c in part) for part in taken) == [6, 6]  # type: ignore[union-attr]


def test_a_full_asset_blocks_its_source_then_drops_and_counts() -> None:
    drops: list[tuple[int, int]] = []
    q = FairQueue(2, max_readings=10, on_drop=lambda a, n: drops.append((a, n)), block_s=0.05)
    q.put(_chunk(0, 8))
    q.put(_chunk(0, 50))  # over budget for a non-empty queue: waits, then dropped
    assert drops == [(0, 50)] and q.pending(0) == 8
    q.put(_chunk(1, 50))  # another asset: its own budget, an empty queue always takes one
    assert q.pending(1) == 50

    # Back-pressure: a source waiting on a full asset goes on once the pipeline takes.
    q2 = FairQueue(1, max_readings=10, on_drop=lambda a, n: drops.append((a, n)), block_s=60)
    q2.put(_chunk(0, 10))
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (q2.put(_chunk(0, 5)), done.set()))
    waiter.start()
    assert not done.wait(0.2)  # still waiting: the asset is full
    assert len(q2.take(limit=1, timeout=0)) == 1
    assert done.wait(30), "the waiting source was not woken"
    waiter.join()
    assert q2.pending(0) == 5 and len(drops) == 1


def test_take_waits_for_a_message_and_returns_empty_after_the_timeout() -> None:
    q = FairQueue(1, max_readings=10, on_drop=lambda a, n: None)
    started = time.monotonic()
    assert q.take(limit=5, timeout=0.05) == []
    assert time.monotonic() - started >= 0.04
    threading.Timer(0.05, lambda: q.put((0, 0, 1.0, 1.0))).start()
    assert len(q.take(limit=5, timeout=30)) == 1


@pytest.mark.integration
def test_the_agent_counts_backlog_drops_in_its_health(tmp_path: object) -> None:
    from pathlib import Path

    from tests.support.bundles import train_small
    from tests.support.datapath import Site, site_config

    root = Path(str(tmp_path))
    bundle, key = train_small(root / "model")
    config = site_config(root, bundle, ingest={"max_backlog_readings": 100, "backlog_block_s": 0})
    site = Site(config, bundle, key.public_key(), root / "run")  # no pipeline thread: held
    try:
        for i in range(50):
            site.runtime.pipeline.queue.put((0, 0, float(i), 1.0))
        site.runtime.pipeline.queue.put(_chunk(0, 96))  # 146 > 100 waiting: dropped and counted
        health = site.runtime.health(disk_free=0)
        assert health.dropped_by_reason["backlog_full"] == 96, dict(health.dropped_by_reason)
        assert site.runtime.pipeline.queue.pending(0) == 50
    finally:
        site.stop()
