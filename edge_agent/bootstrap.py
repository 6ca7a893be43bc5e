"""The bootstrap file: what a device needs to enroll (addresses, CA certificate, one-time token).

Contract module: `autoglm device register --bootstrap-out` writes it and
`autoglm-edge enroll` reads it.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import yaml
from cryptography import x509
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from edge_agent.errors import ConfigError, LocalStateError
from edge_agent.files import replace_atomically
from edge_agent.settings import read_yaml_mapping

KIND = "autoglm-bootstrap"


class Bootstrap(BaseModel):
    """Everything `autoglm-edge enroll` needs to reach the control plane and prove who it is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = Field(default=KIND, pattern=f"^{KIND}$")
    version: int = Field(default=1, ge=1, le=1)
    # A registered device's bootstrap names it; a group's (factory images) names the group,
    # and each device enrolls under its own name (`autoglm-edge enroll --name`).
    device_id: str = ""
    device_name: str = ""
    group: str = ""
    api_address: str = Field(min_length=3)
    device_address: str = Field(min_length=3)
    tls_server_name: str = ""
    ca_certificate: str
    token: str = Field(min_length=8)
    expires_at: dt.datetime

    @model_validator(mode="after")
    def _names_a_device_or_a_group(self) -> Bootstrap:
        if not self.group and not (self.device_id and self.device_name):
            raise ValueError("names neither a device (device_id, device_name) nor a group")
        return self

    @field_validator("ca_certificate")
    @classmethod
    def _pem(cls, value: str) -> str:
        try:
            x509.load_pem_x509_certificate(value.encode())
        except ValueError:
            raise ValueError("is not a PEM certificate") from None
        return value

    @field_validator("api_address", "device_address")
    @classmethod
    def _address(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError("must be HOST:PORT")
        return value


def read_bootstrap(path: Path) -> Bootstrap:
    """Parses a bootstrap file; every problem names the file and the key."""
    data = read_yaml_mapping(path)
    try:
        return Bootstrap.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            if err["type"] == "missing":
                problems.append(f"missing key '{key}'")
            elif err["type"] == "extra_forbidden":
                problems.append(f"unknown key '{key}'")
            else:
                problems.append(f"key '{key}': {err['msg']}")
        raise ConfigError(f"{path}: not a valid bootstrap file: " + "; ".join(problems)) from None


def write_bootstrap(path: Path, bootstrap: Bootstrap) -> None:
    """Writes the file with mode 0600 (it holds a secret), replacing it atomically."""
    text = yaml.safe_dump(bootstrap.model_dump(mode="json"), sort_keys=False)
    try:
        replace_atomically(path, text.encode("utf-8"), 0o600)
    except OSError as exc:
        raise LocalStateError(f"cannot write the bootstrap file {path}: {exc.strerror}") from None
