"""Device profiles as data: every shipped profile fits the schema and pins its base image;
bad files are clear errors; the control plane and `build-engines` use them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cloud.cli.model_cmds import engine_targets
from cloud.profiles import DEFAULT_DIR, load_profiles
from edge_agent.errors import ConfigError, InvalidInput
from protos.autoglm.v1 import operator_pb2
from tests.support.cloud import RunningPlane

pytestmark = pytest.mark.unit


def test_the_shipped_profiles_cover_the_supported_jetsons() -> None:
    profiles = load_profiles(DEFAULT_DIR)
    assert set(profiles) == {
        "jetson-agx-orin",
        "jetson-orin-nx",
        "jetson-orin-nano",
        "jetson-xavier-nx",
    }
    for p in profiles.values():
        assert p.jetpack.startswith("6.") if "orin" in p.name else p.jetpack.startswith("5.1")
        assert p.compute_capability == ("8.7" if "orin" in p.name else "7.2")
        assert "@sha256:" in p.agent_base_image or ":" in p.agent_base_image.rsplit("/", 1)[1]
    assert profiles["jetson-orin-nano"].dla_cores == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cuda": "twelve"}, "cuda: Value error, 'twelve' is not a version"),
        ({"agent_base_image": "nvcr.io/nvidia/l4t-tensorrt:latest"}, "not a pinned image"),
        ({"agent_base_image": "ubuntu"}, "not a pinned image"),
        ({"dla_cores": 5}, "dla_cores"),
        ({"colour": "green"}, "colour: Extra inputs"),
        ({"name": "other-name"}, "differs from the file name"),
    ],
)
def test_a_bad_profile_is_a_clear_error(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    doc = yaml.safe_load((DEFAULT_DIR / "jetson-orin-nx.yaml").read_text()) | change
    (tmp_path / "jetson-orin-nx.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=message) as err:
        load_profiles(tmp_path)
    assert "jetson-orin-nx.yaml" in str(err.value)


def test_engine_targets_come_from_the_profiles() -> None:
    assert engine_targets(["all"], None) == sorted(load_profiles(DEFAULT_DIR))
    assert engine_targets(["jetson-orin-nano"], None) == ["jetson-orin-nano"]
    with pytest.raises(InvalidInput, match="not a device profile"):
        engine_targets(["jetson-tx1"], None)


@pytest.mark.integration
def test_registration_checks_the_profile(plane: RunningPlane) -> None:
    with plane.client() as client:
        client.register_device(
            operator_pb2.RegisterDeviceRequest(name="a", profile="jetson-agx-orin")
        )
        with pytest.raises(InvalidInput, match="unknown device profile 'jetson-tx1'"):
            client.register_device(
                operator_pb2.RegisterDeviceRequest(name="b", profile="jetson-tx1")
            )
        assert [d.name for d in client.list_devices()] == ["a"]
