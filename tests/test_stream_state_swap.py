"""A swap whose new model fails to start: the old model's stream state must still be there
for the data path that starts again on the old model. Building the new model's data path
leaves a state of another model or sensors in place; it goes once that data path has started
(`StreamStates.started`), or is replaced by its first checkpoint or stop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.stream_state import StreamStates

pytestmark = pytest.mark.unit
SENSORS = ("flow", "pressure")


def test_a_state_of_another_model_is_left_for_the_old_model_to_resume(tmp_path: Path) -> None:
    states = StreamStates(tmp_path / "stream")
    states.write("pump-1", "v1", SENSORS, {"ring": np.arange(6.0)})
    path = tmp_path / "stream" / "pump-1.npz"
    # The new model's data path is built (takes its states), then fails to start.
    assert StreamStates(tmp_path / "stream").take("pump-1", "v2", SENSORS, keep=True) is None
    assert path.exists(), "the old model's stream state was removed by the new model's build"
    # Other sensors, same model: not resumed either, and not removed.
    assert StreamStates(tmp_path / "stream").take("pump-1", "v1", ("flow",)) is None
    assert path.exists()
    # The data path starts again on the old model and resumes its stream.
    resumed = StreamStates(tmp_path / "stream").take("pump-1", "v1", SENSORS, keep=True)
    assert resumed is not None
    np.testing.assert_array_equal(resumed["ring"], np.arange(6.0))


def test_a_state_of_another_model_goes_once_the_new_data_path_has_started(
    tmp_path: Path,
) -> None:
    states = StreamStates(tmp_path / "stream")
    states.write("pump-1", "v1", SENSORS, {"ring": np.arange(6.0)})
    states.write("pump-2", "v1", SENSORS, {"ring": np.arange(3.0)})
    new = StreamStates(tmp_path / "stream")
    assert new.take("pump-1", "v2", SENSORS, keep=True) is None
    assert new.take("pump-2", "v2", SENSORS, keep=True) is None
    # pump-2's first checkpoint under the new model replaced its file before `started`.
    new.write("pump-2", "v2", SENSORS, {"ring": np.arange(4.0)})
    new.started()
    assert not (tmp_path / "stream" / "pump-1.npz").exists()  # no stale stop resumed later
    kept = new.take("pump-2", "v2", SENSORS, keep=True)
    assert kept is not None, "started removed the new model's own checkpoint"
    np.testing.assert_array_equal(kept["ring"], np.arange(4.0))
    new.started()  # nothing left to remove: a no-op
    assert (tmp_path / "stream" / "pump-2.npz").exists()


def test_a_state_of_another_model_rewritten_meanwhile_is_not_removed(tmp_path: Path) -> None:
    """Another data path on the same directory (the old one's stop racing a slow build) wrote
    it again after `take` saw it: `started` leaves the newer file."""
    states = StreamStates(tmp_path / "stream")
    states.write("pump-1", "v1", SENSORS, {"ring": np.arange(6.0)})
    new = StreamStates(tmp_path / "stream")
    assert new.take("pump-1", "v2", SENSORS, keep=True) is None
    StreamStates(tmp_path / "stream").write("pump-1", "v1", SENSORS, {"ring": np.arange(7.0)})
    new.started()
    assert (tmp_path / "stream" / "pump-1.npz").exists()
