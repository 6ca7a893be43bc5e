"""Signing roots (edge_agent/trust.py) and key rotation on the control plane's state dir
(cloud/signing_keys.py): who may hand trust on, what a device keeps, what it refuses."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud.pki import CertificateAuthority, new_private_key
from cloud.signing_keys import describe, retire, rotate
from cloud.state_dir import SIGNING_KEY, SIGNING_ROOT, load_secrets
from edge_agent.errors import FailedPrecondition, IntegrityError
from edge_agent.trust import (
    DeviceTrust,
    StaleRoot,
    TrustedKeys,
    accept_root,
    key_id,
    parse_root,
    sign_root,
)
from tests.support.cloud import init_plane

pytestmark = pytest.mark.unit
NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)
YEAR = dt.timedelta(days=365)


def _keys(n: int) -> list[ed25519.Ed25519PrivateKey]:
    return [ed25519.Ed25519PrivateKey.generate() for _ in range(n)]


def test_a_root_signed_by_a_trusted_key_and_a_listed_one_hands_trust_on() -> None:
    old, new = _keys(2)
    trusted = TrustedKeys([old.public_key()])
    doc = sign_root(2, NOW + YEAR, [old.public_key(), new.public_key()], [old, new])
    root = accept_root(doc, trusted, 1, NOW)
    assert root.version == 2 and set(root.keys) == {key_id(old.public_key()),
                                                    key_id(new.public_key())}  # fmt: skip
    keys = root.trusted()
    keys.verify(new.sign(b"manifest"), b"manifest")
    keys.verify(old.sign(b"manifest"), b"manifest")
    # Then the old key is retired: a root listing only the new one, signed by it.
    retired = accept_root(sign_root(3, NOW + YEAR, [new.public_key()], [new]), keys, 2, NOW)
    with pytest.raises(InvalidSignature):
        retired.trusted().verify(old.sign(b"manifest"), b"manifest")


@pytest.mark.parametrize(
    "case, message",
    [
        ("stranger", "not signed by a key this device trusts"),
        ("unlisted", "not signed by any key it lists"),
        ("expired", "expired at"),
        ("tampered", "not signed by a key this device trusts"),
    ],
)
def test_roots_a_device_must_not_take(case: str, message: str) -> None:
    old, new, stranger = _keys(3)
    trusted = TrustedKeys([old.public_key()])
    listed = [new.public_key()]
    if case == "stranger":  # a stranger lists itself: signed by a listed key, not a trusted one
        doc = sign_root(2, NOW + YEAR, [stranger.public_key()], [stranger])
    elif case == "unlisted":  # the old key alone vouches for a key whose holder did not sign
        doc = sign_root(2, NOW + YEAR, listed, [old])
    elif case == "expired":
        doc = sign_root(2, NOW - dt.timedelta(seconds=1), listed, [old, new])
    else:  # a key swapped in after signing
        signed = json.loads(sign_root(2, NOW + YEAR, [old.public_key()], [old]))
        forged = json.loads(sign_root(2, NOW + YEAR, [stranger.public_key()], [stranger]))
        signed["signed"]["keys"] = forged["signed"]["keys"]
        doc = json.dumps(signed).encode()
    with pytest.raises(IntegrityError, match=message):
        accept_root(doc, trusted, 1, NOW)


def test_an_older_or_equal_version_is_stale_not_an_error() -> None:
    (old,) = _keys(1)
    doc = sign_root(2, NOW + YEAR, [old.public_key()], [old])
    with pytest.raises(StaleRoot):
        accept_root(doc, TrustedKeys([old.public_key()]), 2, NOW)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_any_bytes_are_a_root_or_an_integrity_error(document: bytes) -> None:
    with contextlib.suppress(IntegrityError):
        parse_root(document, "fuzz")


def test_deeply_nested_json_is_an_integrity_error() -> None:
    with pytest.raises(IntegrityError, match="not a valid signing root"):
        parse_root(b"[" * 60_000, "nested")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["signed"].update(version=True),
        lambda d: d["signed"].update(version=2**40),
        lambda d: d["signed"].update(kind="other"),
        lambda d: d["signed"].update(keys={}),
        lambda d: d["signed"]["keys"].update({"0" * 16: next(iter(d["signed"]["keys"].values()))}),
        lambda d: d.update(signatures=[{"keyid": "x", "sig": "!!"}]),
        lambda d: d.update(signatures="no"),
        lambda d: d["signed"].update(expires="tomorrow"),
        lambda d: d["signed"].update(version=[[1]]),
    ],
)
def test_malformed_roots_are_integrity_errors(mutate: object) -> None:
    (key,) = _keys(1)
    doc = json.loads(sign_root(2, NOW + YEAR, [key.public_key()], [key]))
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(IntegrityError):
        parse_root(json.dumps(doc).encode(), "test")


def test_a_device_keeps_the_root_it_took_and_falls_back_to_its_pin_on_a_corrupt_file(
    tmp_path: Path,
) -> None:
    old, new = _keys(2)
    trust = DeviceTrust(tmp_path, old.public_key())
    assert trust.version == 1
    doc = sign_root(2, NOW + YEAR, [old.public_key(), new.public_key()], [old, new])
    assert trust.take(doc, NOW) is True
    assert trust.take(doc, NOW) is False  # the same root again: nothing to do
    trust.verify(new.sign(b"m"), b"m")
    again = DeviceTrust(tmp_path, old.public_key())  # after a restart
    assert again.version == 2
    again.verify(new.sign(b"m"), b"m")
    (stranger,) = _keys(1)
    with pytest.raises(IntegrityError):
        again.take(sign_root(3, NOW + YEAR, [new.public_key()], [stranger]), NOW)
    assert again.refused == 1 and again.version == 2
    (tmp_path / "trust" / "signing-root.json").write_bytes(b"{broken")
    pinned_only = DeviceTrust(tmp_path, old.public_key())
    assert pinned_only.version == 1
    with pytest.raises(InvalidSignature):
        pinned_only.verify(new.sign(b"m"), b"m")


def test_rotate_then_retire_on_a_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "cloud"
    init_plane(state)
    first = describe(state)
    assert first.version == 1 and first.keys == (first.current,)
    with pytest.raises(FailedPrecondition, match="nothing to retire"):
        retire(state, YEAR, NOW)
    rotated = rotate(state, YEAR, NOW)
    assert rotated.version == 2 and rotated.current != first.current
    assert set(rotated.keys) == {first.current, rotated.current}
    assert (state / "retired-keys" / f"signing-{first.current}.key").is_file()
    secrets = load_secrets(state)
    secrets.trusted_keys().verify(secrets.signing_key.sign(b"m"), b"m")
    # What devices holding only the first key do with it: take it.
    device = TrustedKeys([parse_root(secrets.signing_root, "r").keys[first.current]])
    accept_root(secrets.signing_root, device, 1, NOW)
    retired = retire(state, YEAR, NOW)
    assert retired.version == 3 and retired.keys == (rotated.current,)
    # A device that never took root 2 (it trusts the first key alone) can take root 3: the
    # retired key kept under retired-keys/ signed it too.
    taken = accept_root(load_secrets(state).signing_root, device, 1, NOW)
    assert set(taken.keys) == {rotated.current}
    # A signing key the root does not list is refused at start, with the reason.
    (state / SIGNING_KEY).write_bytes((state / "retired-keys" /
                                       f"signing-{first.current}.key").read_bytes())  # fmt: skip
    with pytest.raises(IntegrityError, match=f"not one of the keys .*{SIGNING_ROOT}"):
        load_secrets(state)


def test_the_signing_key_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cloud.cli.main import run as autoglm

    state = tmp_path / "cloud"
    init_plane(state)
    capsys.readouterr()
    assert autoglm(["cloud", "signing-key", "rotate", "--state-dir", str(state)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == 2 and len(shown["keys"]) == 2
    assert autoglm(["cloud", "signing-key", "retire", "--state-dir", str(state)]) == 0
    assert json.loads(capsys.readouterr().out)["keys"] == [shown["current"]]
    code = autoglm(["cloud", "signing-key", "retire", "--state-dir", str(state)])
    assert code != 0 and "nothing to retire" in capsys.readouterr().err
    bad = ["cloud", "signing-key", "rotate", "--state-dir", str(state), "--valid-for", "soon"]
    assert autoglm(bad) != 0 and "--valid-for" in capsys.readouterr().err


def test_a_root_may_carry_the_fleet_cas_and_only_ca_certificates() -> None:
    (key,) = _keys(1)
    old, new = CertificateAuthority.create("old"), CertificateAuthority.create("new")
    doc = sign_root(2, NOW + YEAR, [key.public_key()], [key], [old.cert_pem, new.cert_pem])
    root = accept_root(doc, TrustedKeys([key.public_key()]), 1, NOW)
    assert root.cas == (old.cert_pem, new.cert_pem)
    assert root.ca_bundle == old.cert_pem + new.cert_pem
    # Without CAs the document is as before (older agents verify the same bytes).
    assert "cas" not in json.loads(sign_root(2, NOW + YEAR, [key.public_key()], [key]))["signed"]
    leaf = old.issue_server_certificate(["localhost"], new_private_key())
    not_a_ca = leaf.public_bytes(Encoding.PEM)
    for cas, message in (
        ([not_a_ca], "is not one CA certificate"),
        ([b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"], "not a CA"),
        ([old.cert_pem] * 5, "at most 4 CAs"),
    ):
        bad = sign_root(2, NOW + YEAR, [key.public_key()], [key], cas)
        with pytest.raises(IntegrityError, match=message):
            parse_root(bad, "root")
