"""QueryPredictions by time range (`since` and `until`), as the console's alert page asks for
the windows around an alert: over the real sync path into the store."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from edge_agent.errors import InvalidInput
from protos.autoglm.v1 import operator_pb2
from tests.support.agents import wait_for
from tests.support.alerting import T0, open_site, prediction

pytestmark = pytest.mark.integration


def _at(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


def test_predictions_between_since_and_until(tmp_path: Path) -> None:
    with open_site(tmp_path) as site, site.plane.client() as client:
        site.outbox.append([prediction("pump-1", T0 + 10 * i, 0.1 * i) for i in range(20)])

        def query(limit: int = 0, **bounds: float) -> list[float]:
            request = operator_pb2.QueryPredictionsRequest(device="edge-1", limit=limit)
            for name, seconds in bounds.items():
                getattr(request, name).FromDatetime(_at(seconds))
            return [p.window_end.ToNanoseconds() / 1e9 for p in client.query_predictions(request)]

        wait_for(lambda: len(query()) == 20)
        assert query(since=T0 + 50, until=T0 + 80) == [T0 + 50, T0 + 60, T0 + 70, T0 + 80]
        assert query(until=T0 + 20) == [T0, T0 + 10, T0 + 20]
        # The newest `limit` inside the range, oldest first.
        assert query(limit=2, since=T0, until=T0 + 80) == [T0 + 70, T0 + 80]
        assert query(since=T0 + 500) == []
        with pytest.raises(InvalidInput, match="until is before since"):
            query(since=T0 + 80, until=T0 + 50)
