"""A swap whose new model fails to start, on the real data path: building the new model's
runtime leaves the old model's stream state, so the data path started again on the old model
resumes its window ring; once a runtime on the new model has started, the old state goes."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.outbox import Outbox
from edge_agent.runtime import EdgeRuntime
from edge_agent.serving import open_serving
from tests.support.bundles import make_version, train_small
from tests.support.datapath import Site, pump, site_config

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]


def test_a_failed_swap_leaves_the_old_models_stream_to_resume(tmp_path: Path) -> None:
    trained = train_small(tmp_path / "model")
    bundle, key = trained
    v2 = make_version(trained, tmp_path / "v2", "2", key)
    config = site_config(tmp_path, bundle)
    path = config.state_dir / "stream" / "pump-1.npz"
    old = Site(config, bundle, key.public_key(), tmp_path / "m1")
    old.feed(pump(300, faulty=False, seed=1), 0)
    filled = old.runtime.runners[0].filled
    old.stop(graceful=True)  # Agent.swap: the old runtime stops, keeping its stream
    assert path.exists() and filled > 0

    def build_new() -> EdgeRuntime:  # ... the new model's runtime is built
        model = open_serving(v2, key.public_key(), config.model, tmp_path / "m2", tmp_path / "e2")
        outbox = Outbox(config.state_dir / "outbox.sqlite3", 1 << 24)
        runtime = EdgeRuntime(config, model, outbox, "t")
        outbox.close()
        model.close()
        return runtime

    build_new()  # ... and its start fails
    assert path.exists(), "building the new model's runtime removed the old model's stream"
    again = Site(config, bundle, key.public_key(), tmp_path / "m3")  # Agent._restart(old)
    assert again.runtime.runners[0].filled == filled, "the old model's stream was not resumed"
    again.stop(graceful=True)

    build_new().streams.started()  # a swap whose new runtime started
    assert not path.exists(), "the old model's stream outlived a started swap"
