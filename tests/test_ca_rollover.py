"""Changing the fleet's CA without re-enrolling (cloud/ca_rollover.py): a real control plane
and real agents. `rotate` introduces a new CA through the signing root (agents trust both);
`activate` makes it issue, and agents renew under it when their session opens (one of them
offline until then); `retire` keeps the new CA alone: the server certificate is its own, the
agents reconnect, and a certificate of the old CA is refused. Plus the state dir's steps
after crashes, and what the secret box keeps."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pytest
from cryptography import x509

from cloud.ca_rollover import activate, describe, retire, rotate
from cloud.pki import certificate_fingerprint
from cloud.signing_keys import devices_without_roots
from cloud.signing_keys import rotate as rotate_key
from cloud.state_dir import BOX_KEY, CA_BUNDLE, CA_CERT, CA_KEY, CA_NEXT_KEY, load_secrets
from edge_agent.config import load_agent_config
from edge_agent.errors import FailedPrecondition, IntegrityError
from edge_agent.identity import identity_dir, load_identity
from edge_agent.trust import parse_root, sign_root
from tests.conftest import register
from tests.support.agents import enroll_identity, start_agent, start_session, wait_for
from tests.support.broker import Broker
from tests.support.cloud import RunningPlane, init_plane, start_plane

YEAR = dt.timedelta(days=365)
SETTINGS = {"presence_flush_interval_s": 0.2, "auth_recheck_interval_s": 0.3}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _restart(plane: RunningPlane, state: Path) -> RunningPlane:
    """On the same ports: agents and bootstrap files dial them again."""
    api, device = plane.plane.api_port, plane.plane.device_port
    plane.stop()
    return start_plane(state, plane.token, api_listen=f"127.0.0.1:{api}",
                       device_listen=f"127.0.0.1:{device}", **SETTINGS)  # fmt: skip


def _issuer(plane: RunningPlane, name: str) -> str:
    with plane.client() as client:
        return str(client.get_device(name).status.certificate_issuer)


def _status(plane: RunningPlane, name: str) -> str:
    with plane.client() as client:
        return str(client.get_device(name).status)


def _config(state: Path, broker: Broker) -> dict[str, object]:
    return {
        "state_dir": state,
        "cloud": {"heartbeat_interval_s": 0.3, "renew_check_s": 0.2},
        "reconnect": {"initial_s": 0.2, "max_s": 1.0},
        "mqtt": {"port": broker.port, "host": "127.0.0.1"},
        "metrics": {"listen": ""},
    }


def _cas(state: Path) -> list[str]:
    pem = load_identity(state).ca_pem
    return [certificate_fingerprint(c) for c in x509.load_pem_x509_certificates(pem)]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_fleet_moves_to_a_new_ca_without_re_enrolling(tmp_path: Path, broker: Broker) -> None:
    cloud = tmp_path / "cloud"
    token = init_plane(cloud).operator_token
    plane = start_plane(cloud, token, **SETTINGS)
    old = load_secrets(cloud).ca.fingerprint
    material = load_secrets(cloud).key_material
    one, two = tmp_path / "edge-1", tmp_path / "edge-2"
    enroll_identity(register(plane, "edge-1"), one)
    enroll_identity(register(plane, "edge-2"), two)  # stays off until the new CA issues
    early_bootstrap = register(plane, "edge-4")  # used only after the new CA issues
    kept_old = tmp_path / "old-identity"
    shutil.copytree(identity_dir(one), kept_old / "identity")
    first = start_agent(load_agent_config(None, _config(one, broker)))
    second = None
    try:
        wait_for(lambda: _issuer(plane, "edge-1") == old, timeout=60)

        # Before rotating: who has never said which root it holds (warned about by the CLI).
        assert devices_without_roots(cloud) == ["edge-2"]
        # 1. rotate: both CAs trusted; the agent takes them with the root, no renewal yet.
        new = rotate(cloud, YEAR, _now()).introduced
        assert new and new != old
        plane = _restart(plane, cloud)
        wait_for(lambda: first.agent.key.version == 2, timeout=60)
        wait_for(lambda: _cas(one) == [old, new], timeout=30)
        assert first.agent.renewer.renewals == 0

        # An agent too old to follow a CA change (its status says no issuer) holds activate
        # back: it would refuse the next certificate it renews. Revoked, it no longer does.
        enroll_identity(register(plane, "edge-3"), tmp_path / "edge-3")
        old_agent = start_session(load_identity(tmp_path / "edge-3"), model_version="1",
                                  device_address=plane.device_address)  # fmt: skip
        try:
            wait_for(lambda: "model_version" in _status(plane, "edge-3"), timeout=60)
        finally:
            old_agent.stop()
        with pytest.raises(FailedPrecondition, match=r"cannot follow a CA change .*: edge-3"):
            activate(cloud)
        with plane.client() as client:
            client.revoke_device("edge-3", "agent too old for the CA change")

        # 2. activate: the new CA issues; the connected agent is asked to renew under it.
        activate(cloud)
        assert load_secrets(cloud).key_material == material  # webhook secrets stay readable
        plane = _restart(plane, cloud)
        wait_for(lambda: first.agent.renewer.renewals == 1, timeout=60)
        wait_for(lambda: _issuer(plane, "edge-1") == new, timeout=60)
        # edge-2 has not been heard from: retiring now would lock it out.
        with pytest.raises(FailedPrecondition, match=r"edge-2 \(unknown\)"):
            retire(cloud, YEAR, _now())
        # A bootstrap made before the change still enrolls under the new CA (it takes the
        # CAs the control plane serves).
        late = tmp_path / "edge-4"
        enroll_identity(early_bootstrap, late)
        assert _cas(late) == [old, new]
        with plane.client() as client:  # (it never runs here: retire would wait for it)
            client.revoke_device("edge-4", "enrolled only to show the old bootstrap works")
        # Offline through both steps, it still connects (the server certificate is the old
        # CA's until retire), takes the root and renews.
        second = start_agent(load_agent_config(None, _config(two, broker)))
        wait_for(lambda: _issuer(plane, "edge-2") == new, timeout=90)
        assert _cas(two) == [old, new]

        # 3. retire: the new CA alone, and its own server certificate.
        assert retire(cloud, YEAR, _now()).trusted == (new,)
        opened = [a.agent.session.stats.sessions_opened for a in (first, second)]
        plane = _restart(plane, cloud)
        for running, before in zip((first, second), opened, strict=True):
            wait_for(lambda r=running, b=before: r.agent.session.stats.sessions_opened > b, 60)
            wait_for(lambda r=running: r.agent.key.version == 3, timeout=60)
        # (the CA file is written just after the root is taken)
        wait_for(lambda: _cas(one) == [new] and _cas(two) == [new], timeout=30)
        assert not first.agent.session.stats.refused
        # The certificate the old CA issued to edge-1 is refused now.
        stale = start_session(load_identity(kept_old), device_address=plane.device_address)
        try:
            wait_for(lambda: stale.session.stats.last_error != "", timeout=30)
            assert stale.session.stats.sessions_opened == 0
        finally:
            stale.stop()
        # An agent restart keeps the new CA and its renewed certificate.
        first.stop()
        first = start_agent(load_agent_config(None, _config(one, broker)))
        wait_for(lambda: first.agent.session.connected, timeout=60)
        assert first.agent.renewer.renewals == 0  # not asked again: the new CA issued it
    finally:
        first.stop()
        if second is not None:
            second.stop()
        plane.stop()


@pytest.mark.unit
def test_each_step_checks_the_one_before_and_a_crashed_activate_finishes(tmp_path: Path) -> None:
    cloud = tmp_path / "cloud"
    init_plane(cloud)
    old = load_secrets(cloud).ca
    with pytest.raises(FailedPrecondition, match="no CA was introduced"):
        activate(cloud)
    with pytest.raises(FailedPrecondition, match="only the current CA is trusted"):
        retire(cloud, YEAR, _now())
    summary = rotate(cloud, YEAR, _now())
    assert summary.issuing == old.fingerprint and summary.trusted == (
        old.fingerprint,
        summary.introduced,
    )
    root = parse_root((cloud / "signing-root.json").read_bytes(), "root")
    assert root.version == 2 and len(root.cas) == 2
    assert (cloud / CA_BUNDLE).read_bytes() == root.ca_bundle
    with pytest.raises(FailedPrecondition, match="under way already"):
        rotate(cloud, YEAR, _now())
    with pytest.raises(FailedPrecondition, match="activate` first"):
        retire(cloud, YEAR, _now())
    # A crash between activate's swap of the key and of the certificate: the state dir does
    # not load (clear error), and activate run again finishes.
    nxt_key = (cloud / CA_NEXT_KEY).read_bytes()
    (cloud / BOX_KEY).write_bytes(old.key_material())
    (cloud / CA_KEY).write_bytes(nxt_key)
    with pytest.raises(IntegrityError, match="interrupted `autoglm cloud ca activate`"):
        load_secrets(cloud)
    after = activate(cloud)
    assert after.issuing == summary.introduced and after.introduced == ""
    assert load_secrets(cloud).key_material == old.key_material()
    # ca.crt: the issuing CA first, then the old one (tools trusting it still reach the
    # server, whose certificate is the old CA's until retire).
    assert (cloud / CA_CERT).read_bytes() == load_secrets(cloud).ca.cert_pem + old.cert_pem
    assert describe(cloud).root_version == 2
    # No device is enrolled: retire goes through and trusts the new CA alone.
    assert retire(cloud, YEAR, _now()).trusted == (summary.introduced,)
    server = x509.load_pem_x509_certificates(load_secrets(cloud).server_chain_pem)[0]
    server.verify_directly_issued_by(load_secrets(cloud).ca.cert)
    assert (cloud / CA_CERT).read_bytes() == load_secrets(cloud).ca.cert_pem
    # The signing key's rotation keeps the CA list the root carries.
    rotate_key(cloud, YEAR, _now())
    root = parse_root((cloud / "signing-root.json").read_bytes(), "root")
    assert root.version == 4 and root.ca_bundle == load_secrets(cloud).ca.cert_pem


@pytest.mark.unit
def test_retire_and_rotate_finish_after_a_crash_and_box_key_is_guarded(tmp_path: Path) -> None:
    cloud = tmp_path / "cloud"
    init_plane(cloud)
    old = load_secrets(cloud).ca
    # rotate cut short after the new key: run again, it starts over.
    (cloud / CA_NEXT_KEY).write_bytes(b"half a key")
    new = rotate(cloud, YEAR, _now()).introduced
    activate(cloud)
    # box.key is what webhook secrets are sealed with once the CA changed: empty or missing
    # is refused at load, not silently replaced by the new CA's key.
    kept = (cloud / BOX_KEY).read_bytes()
    (cloud / BOX_KEY).write_bytes(b"")
    with pytest.raises(IntegrityError, match="empty"):
        load_secrets(cloud)
    (cloud / BOX_KEY).unlink()
    with pytest.raises(IntegrityError, match=r"box\.key is missing"):
        load_secrets(cloud)
    (cloud / BOX_KEY).write_bytes(kept)
    # A retire that wrote the root (new CA alone) but not the server certificate, as an
    # interrupted run of an earlier order would: retire again issues it instead of saying
    # there is nothing to retire.
    held = parse_root((cloud / "signing-root.json").read_bytes(), "root")
    signing = load_secrets(cloud).signing_key
    document = sign_root(held.version + 1, _now() + YEAR, [signing.public_key()], [signing],
                         [load_secrets(cloud).ca.cert_pem])  # fmt: skip
    (cloud / "signing-root.json").write_bytes(document)
    server = x509.load_pem_x509_certificates(load_secrets(cloud).server_chain_pem)[0]
    server.verify_directly_issued_by(old.cert)  # still the old CA's
    after = retire(cloud, YEAR, _now())
    assert after.trusted == (new,)
    server = x509.load_pem_x509_certificates(load_secrets(cloud).server_chain_pem)[0]
    server.verify_directly_issued_by(load_secrets(cloud).ca.cert)
    with pytest.raises(FailedPrecondition, match="nothing to retire"):
        retire(cloud, YEAR, _now())
