"""Device profiles: what each device class runs (JetPack/L4T, CUDA, TensorRT, cuDNN, GPU
compute capability, memory, DLA), as data in `firmware_images/profiles/*.yaml`.

The control plane checks `device register --profile` against them and `model build-engines
--profile all` builds one engine per profile. A file that does not fit the schema is an
error naming the file and the field.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edge_agent.errors import ConfigError

VERSION = re.compile(r"^\d+(\.\d+){1,3}$")
# Pinned: a registry path with an explicit tag or digest, never "latest".
IMAGE = re.compile(r"^[a-z0-9.-]+(/[a-z0-9._-]+)+(:[A-Za-z0-9._-]+|@sha256:[0-9a-f]{64})$")
DEFAULT_DIR = Path(__file__).resolve().parents[1] / "firmware_images" / "profiles"


class DeviceProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    device: str
    jetpack: str
    l4t: str
    cuda: str
    tensorrt: str
    cudnn: str
    compute_capability: str = Field(pattern=r"^\d+\.\d$")
    memory_gib: int = Field(gt=0)
    dla_cores: int = Field(ge=0, le=2)
    agent_base_image: str

    @field_validator("jetpack", "l4t", "cuda", "tensorrt", "cudnn")
    @classmethod
    def _version(cls, value: str) -> str:
        if not VERSION.match(value):
            raise ValueError(f"{value!r} is not a version like 6.1 or 36.4.0")
        return value

    @field_validator("agent_base_image")
    @classmethod
    def _pinned(cls, value: str) -> str:
        if not IMAGE.match(value) or value.endswith(":latest"):
            raise ValueError(f"{value!r} is not a pinned image (registry/path:tag or @sha256:...)")
        return value


def load_profiles(directory: Path) -> dict[str, DeviceProfile]:
    """Every `*.yaml` under `directory`, by name; ConfigError names the file and field."""
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no device profile directory")
    profiles: dict[str, DeviceProfile] = {}
    for path in sorted(directory.glob("*.yaml")):
        try:
            doc = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: expected a mapping of profile fields")
        try:
            profile = DeviceProfile.model_validate(doc)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "(file)"
            raise ConfigError(f"{path}: {field}: {err['msg']}") from None
        if profile.name != path.stem:
            raise ConfigError(f"{path}: name {profile.name!r} differs from the file name")
        profiles[profile.name] = profile
    if not profiles:
        raise ConfigError(f"{directory}: no device profiles (*.yaml)")
    return profiles
