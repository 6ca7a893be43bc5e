"""Batched messages (many rows of every sensor at once) take the vectorised path through the
aligner and the window cutting; they must score exactly the windows, with exactly the scores
and masks, that the same readings sent one by one score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.support.datapath import Site, pump, site_config

pytestmark = [pytest.mark.integration]


@pytest.mark.parametrize("rows_per_message", [7, 96, 500])
def test_batched_readings_score_what_single_readings_score(
    tmp_path: Path, rows_per_message: int, trained: tuple[Path, Ed25519PrivateKey]
) -> None:
    bundle, key = trained
    rows = np.concatenate([pump(260, faulty=False, seed=1), pump(140, faulty=True, seed=2)])
    rows[rows.shape[0] // 2 :: 17, 1] = np.nan  # missing readings of one sensor
    one = Site(site_config(tmp_path / "a", bundle), bundle, key.public_key(), tmp_path / "a")
    one.feed(rows, 0)
    block = Site(site_config(tmp_path / "b", bundle), bundle, key.public_key(), tmp_path / "b")
    block.feed_block(rows, 0, rows_per_message)
    for site in (one, block):
        site.stop()
    assert len(one.verdicts) > 100, len(one.verdicts)
    assert [v.window_end for v in block.verdicts] == [v.window_end for v in one.verdicts]
    np.testing.assert_allclose(
        [v.score for v in block.verdicts], [v.score for v in one.verdicts], atol=1e-5
    )
    assert [e.kind for e in block.events()] == [e.kind for e in one.events()]
